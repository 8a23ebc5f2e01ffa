"""Mean absolute error of log depth: the robust counterpart of SILog with lambda 0.

``L = alpha * mean_valid |log d - log y|``. Agreement delta1 counts the pixels whose
depth ratio to the reference is within 1.25 (``|log d - log y| < log 1.25``), a count
that a squared log error spends itself on the few pixels furthest out (depth edges, a
wrong far wall) to improve; the absolute error is the convex loss closest to that count
and is minimised by the median, not the mean, of each pixel's log ratio.
"""

from __future__ import annotations

from torch import Tensor, nn

from depthkd_core.losses.common import LOSSES
from depthkd_core.losses.common import check_inputs, log_ratio, masked_mean


@LOSSES.register("log_l1")
class LogL1Loss(nn.Module):
    """``alpha * mean_valid |log pred - log target|``; depths clamped to ``min_depth``
    before the log, so zero or negative values never give -inf. ``alpha`` (default 10, as
    SILog's) keeps the gradient on the scale of SILog's, which matters under gradient
    clipping."""

    def __init__(self, alpha: float = 10.0, min_depth: float = 1e-6) -> None:
        super().__init__()
        if alpha <= 0 or min_depth <= 0:
            raise ValueError(f"log_l1 needs alpha > 0 and min_depth > 0, got {alpha}, {min_depth}")
        self.alpha, self.min_depth = alpha, min_depth

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = check_inputs(pred, target, mask)
        g = log_ratio(pred, target, self.min_depth)
        return self.alpha * masked_mean(g.abs(), mask)
