"""Input checks and masked reductions shared by the depth losses."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from depthkd_core.registry import Registry

# Every loss class registers itself here (``depthkd_core.losses`` imports them all).
LOSSES: Registry[type[nn.Module]] = Registry("loss")


def check_inputs(pred: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    """Validate (B,1,H,W) ``pred``/``target`` and return a bool mask of the same shape."""
    if pred.dim() != 4 or pred.shape[1] != 1:
        raise ValueError(f"pred must be (B,1,H,W), got {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"target shape {tuple(target.shape)} != pred shape {tuple(pred.shape)}")
    if mask is None:
        return torch.ones_like(pred, dtype=torch.bool)
    if mask.shape != pred.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != pred shape {tuple(pred.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    return mask


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask``; 0 (still attached to the graph) if nothing is valid.

    Uses ``where`` so inf/NaN at masked-out pixels cannot leak into the value,
    and shapes stay static (no boolean indexing).
    """
    count = mask.sum()
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / count.clamp(min=1)


def log_ratio(pred: Tensor, target: Tensor, min_depth: float) -> Tensor:
    """``log pred - log target`` per pixel, depths clamped to ``min_depth`` first so zero
    or negative values never give -inf (the log losses' residual)."""
    return torch.log(pred.clamp(min=min_depth)) - torch.log(target.clamp(min=min_depth))
