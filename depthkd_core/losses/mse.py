"""Masked mean squared error (L2) depth loss."""

from __future__ import annotations

from torch import Tensor, nn

from depthkd_core.losses.common import LOSSES
from depthkd_core.losses.common import check_inputs, masked_mean


@LOSSES.register("mse")
class MSELoss(nn.Module):
    """``L = mean_valid (pred - target)^2``."""

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = check_inputs(pred, target, mask)
        return masked_mean((pred - target) ** 2, mask)
