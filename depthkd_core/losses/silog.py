"""Scale-invariant logarithmic (SILog) loss.

Eigen et al., NeurIPS 2014, Eq. 4, in the scaled square-root form used by
AdaBins/DisDepth (METHODS.md section 3)::

    g_i = log d_i - log y_i
    L   = alpha * sqrt(mean(g^2) - lambda * mean(g)^2)

The means run over all valid pixels of the batch (as AdaBins does), not per image.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from depthkd_core.losses.common import LOSSES
from depthkd_core.losses.common import check_inputs, log_ratio, masked_mean


def safe_sqrt(value: Tensor, eps: float) -> Tensor:
    """sqrt that is exactly 0 at 0 with a finite gradient: linear below ``eps``.

    ``torch.sqrt`` has an infinite derivative at 0, which turns a perfect
    prediction into NaN gradients.
    """
    value = value.clamp(min=0.0)
    return torch.where(value > eps, torch.sqrt(value.clamp(min=eps)), value / math.sqrt(eps))


@LOSSES.register("silog")
class SILogLoss(nn.Module):
    """SILog with ``alpha`` = 10 and ``lambd`` = 0.85 (METHODS.md section 3).

    Depths are clamped to ``min_depth`` before the log so zero or negative
    values never produce -inf.
    """

    def __init__(self, alpha: float = 10.0, lambd: float = 0.85, min_depth: float = 1e-6,
                 eps: float = 1e-12) -> None:
        super().__init__()
        if not 0.0 <= lambd <= 1.0:
            raise ValueError(f"SILog lambd must be in [0, 1], got {lambd}")
        if min_depth <= 0:
            raise ValueError(f"SILog min_depth must be > 0, got {min_depth}")
        self.alpha, self.lambd, self.min_depth, self.eps = alpha, lambd, min_depth, eps

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = check_inputs(pred, target, mask)
        g = log_ratio(pred, target, self.min_depth)
        variance = masked_mean(g * g, mask) - self.lambd * masked_mean(g, mask) ** 2
        return self.alpha * safe_sqrt(variance, self.eps)
