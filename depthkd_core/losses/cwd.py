"""Channel-wise distillation (CWD) on a per-image normalised depth map.

Gao et al., *Robust lightweight depth estimation via data-free distillation*,
Eq. (a) (METHODS.md s.2): per image, over the W*H pixels,
``phi(d)_i = softmax_i(d_i / tau)`` and
``l_cwd = tau^2 * sum_i phi(d^T)_i * log(phi(d^T)_i / phi(d^S)_i)``.
Depth is normalised per image first, so the loss is invariant to the unknown
shift and scale of a relative-depth teacher.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from depthkd_core.losses.common import LOSSES
from depthkd_core.losses.common import check_inputs

NORMALISATIONS = ("median_mad", "mean_std", "none")


def normalise_depth(depth: Tensor, mask: Tensor, mode: str = "median_mad",
                    eps: float = 1e-6) -> Tensor:
    """Per-image ``(d - centre) / spread`` over the valid pixels of (B,1,H,W) ``depth``.

    median_mad (default): median and mean absolute deviation from it (MiDaS-style);
    mean_std: mean and standard deviation; none: ``depth`` unchanged.
    """
    if mode == "none":
        return depth
    if mode not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got '{mode}'")
    flat = torch.where(mask, depth, torch.full_like(depth, float("nan"))).flatten(1)
    if mode == "median_mad":
        centre = flat.nanmedian(dim=1, keepdim=True).values
        spread = (flat - centre).abs().nanmean(dim=1, keepdim=True)
    else:
        centre = flat.nanmean(dim=1, keepdim=True)
        spread = ((flat - centre) ** 2).nanmean(dim=1, keepdim=True).sqrt()
    # Images without valid pixels give NaN statistics; they are masked out later.
    centre, spread = centre.nan_to_num(0.0), spread.nan_to_num(1.0)
    return ((depth.flatten(1) - centre) / (spread + eps)).view_as(depth)


@LOSSES.register("cwd")
class ChannelWiseDistillation(nn.Module):
    """``tau^2 * KL(phi(T) || phi(S))`` over the valid pixels, mean over images (Gao et al. Eq. a).

    ``pred`` is the student's map, ``target`` the teacher's, both in the same
    space (depth, or inverse depth for a disparity teacher).
    """

    def __init__(self, tau: float = 1.0, normalisation: str = "median_mad") -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"cwd temperature tau must be > 0, got {tau}")
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got '{normalisation}'")
        self.tau, self.normalisation = float(tau), normalisation

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = check_inputs(pred, target, mask)
        flat_mask = mask.flatten(1)
        log_phi = {}
        for name, depth in (("s", pred), ("t", target)):
            logits = normalise_depth(depth, mask, self.normalisation).flatten(1) / self.tau
            logits = torch.where(flat_mask, logits, torch.full_like(logits, float("-inf")))
            log_phi[name] = torch.log_softmax(logits, dim=1)
        # where() before the product: -inf - -inf at masked pixels would be NaN
        log_ratio = torch.where(flat_mask, log_phi["t"] - log_phi["s"], torch.zeros_like(log_phi["t"]))
        phi_t = torch.where(flat_mask, log_phi["t"].exp(), torch.zeros_like(log_ratio))
        per_image = (phi_t * log_ratio).sum(dim=1)
        has_pixels = flat_mask.any(dim=1)
        total = torch.where(has_pixels, per_image, torch.zeros_like(per_image)).sum()
        return self.tau ** 2 * total / has_pixels.sum().clamp(min=1)
