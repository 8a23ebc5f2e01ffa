"""Masked L1 (mean absolute error) depth loss."""

from __future__ import annotations

from torch import Tensor, nn

from depthkd_core.losses.common import LOSSES
from depthkd_core.losses.common import check_inputs, masked_mean


@LOSSES.register("l1")
class L1Loss(nn.Module):
    """``L = mean_valid |pred - target|``."""

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = check_inputs(pred, target, mask)
        return masked_mean((pred - target).abs(), mask)
