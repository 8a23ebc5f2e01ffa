"""TIE-KD depth-probability-map KL (Choi et al., METHODS.md s.4).

The teacher's depth becomes a Gaussian DPM over the student's K bin centres,
``P^T_k = softmax_k(-(c_k - d^T)^2 / (2 sigma^2))``, and the student's DPM
``P^S`` (its head's softmax) is pulled towards it by ``KL(P^T || P^S)`` per
pixel, averaged over the valid pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from depthkd_core.losses.common import masked_mean


def _check_centers(centers: Tensor, batch: int) -> Tensor:
    if centers.dim() == 1:
        centers = centers.unsqueeze(0).expand(batch, -1)
    if centers.dim() != 2 or centers.shape[0] != batch:
        raise ValueError(f"bin centres must be (K,) or (B={batch},K), got {tuple(centers.shape)}")
    return centers


def teacher_dpm_logits(depth: Tensor, centers: Tensor, sigma: float) -> Tensor:
    """(B,K,H,W) log P^T: log-softmax over k of ``-(c_k - d)^2 / (2 sigma^2)``."""
    if depth.dim() != 4 or depth.shape[1] != 1:
        raise ValueError(f"teacher depth must be (B,1,H,W), got {tuple(depth.shape)}")
    if sigma <= 0:
        raise ValueError(f"DPM sigma must be > 0, got {sigma}")
    centers = _check_centers(centers, depth.shape[0]).to(depth)
    logits = -((centers[:, :, None, None] - depth) ** 2) / (2.0 * sigma ** 2)
    return torch.log_softmax(logits, dim=1)


def teacher_dpm(depth: Tensor, centers: Tensor, sigma: float) -> Tensor:
    """(B,K,H,W) P^T, sums to 1 over k at every pixel."""
    return teacher_dpm_logits(depth, centers, sigma).exp()


class DPMKLDivergence(nn.Module):
    """``mean_valid sum_k P^T_k (log P^T_k - log P^S_k)``.

    Called as ``loss(student_probs (B,K,H,W), centers (B,K) | (K,), teacher_depth (B,1,H,W),
    mask=None)``; pixels where the teacher depth is not finite and > 0 are skipped.
    """

    def __init__(self, sigma: float = 0.5, eps: float = 1e-8) -> None:
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"DPM sigma must be > 0, got {sigma}")
        self.sigma, self.eps = float(sigma), eps

    def forward(self, probs: Tensor, centers: Tensor, teacher_depth: Tensor,
                mask: Tensor | None = None) -> Tensor:
        if probs.dim() != 4 or probs.shape[0] != teacher_depth.shape[0] \
                or probs.shape[2:] != teacher_depth.shape[2:]:
            raise ValueError(f"student probs {tuple(probs.shape)} do not match teacher depth "
                             f"{tuple(teacher_depth.shape)} (need (B,K,H,W) and (B,1,H,W))")
        valid = torch.isfinite(teacher_depth) & (teacher_depth > 0)
        mask = valid if mask is None else mask & valid
        safe_depth = torch.where(valid, teacher_depth, torch.ones_like(teacher_depth))
        log_pt = teacher_dpm_logits(safe_depth, centers, self.sigma)
        # the student gives probabilities, not logits; clamp keeps log finite
        log_ps = probs.clamp(min=self.eps).log()
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1, keepdim=True)
        return masked_mean(kl, mask)
