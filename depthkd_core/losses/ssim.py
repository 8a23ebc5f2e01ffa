"""SSIM depth loss ``(1 - SSIM(pred, target)) / 2`` (TIE-KD, METHODS.md s.4), via kornia."""

from __future__ import annotations

import kornia
from torch import Tensor, nn

from depthkd_core.losses.common import LOSSES
from depthkd_core.losses.common import check_inputs, masked_mean


@LOSSES.register("ssim")
class SSIMLoss(nn.Module):
    """Mean over valid pixels of ``(1 - SSIM map) / 2``.

    ``max_val`` is the dynamic range L in SSIM's constants C1 = (0.01 L)^2,
    C2 = (0.03 L)^2: for depth, the student's max_depth (metres).
    Gaussian window (sigma 1.5) of ``window_size`` pixels, reflect padding.
    """

    def __init__(self, window_size: int = 11, max_val: float = 10.0) -> None:
        super().__init__()
        if window_size < 3 or window_size % 2 == 0:
            raise ValueError(f"ssim window_size must be odd and >= 3, got {window_size}")
        if max_val <= 0:
            raise ValueError(f"ssim max_val must be > 0, got {max_val}")
        self.window_size, self.max_val = window_size, float(max_val)

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = check_inputs(pred, target, mask)
        ssim = kornia.metrics.ssim(pred, target, self.window_size, max_val=self.max_val)
        return masked_mean((1.0 - ssim) / 2.0, mask)
