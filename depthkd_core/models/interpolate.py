"""Weight-space interpolation between a network's starting weights and its fine-tuned ones.

``(1 - alpha) * start + alpha * tuned`` per floating-point tensor (WiSE-FT: Wortsman et
al., "Robust fine-tuning of zero-shot models", CVPR 2022). A student that starts as its
teacher and is then distilled on simulated images lies, at every alpha between, on a line
from the teacher's own weights to the fitted ones; the fine-tuned end fits the transfer
set best, the points between often carry over better to images unlike it
(docs/student.md). Both ends must be the same architecture (one fine-tuned from the other),
so every parameter and buffer pairs up.
"""

from __future__ import annotations

import torch
from torch import nn


def interpolate_weights(start: nn.Module, tuned: nn.Module, alpha: float) -> dict[str, torch.Tensor]:
    """The state dict ``(1 - alpha) * start + alpha * tuned`` (integer buffers, and entries
    equal at both ends, ``tuned``'s).
    ValueError when the two do not have the same tensors, or ``alpha`` is outside [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"interpolation alpha must be in [0, 1], got {alpha}")
    a, b = start.state_dict(), tuned.state_dict()
    mismatch = sorted(set(a) ^ set(b)) + sorted(k for k in set(a) & set(b) if a[k].shape != b[k].shape)
    if mismatch:
        raise ValueError(f"cannot interpolate networks of different shapes: {mismatch[:5]} differ")
    return {k: _lerp(a[k].to(v.dtype), v, alpha) if v.is_floating_point() else v.clone()
            for k, v in b.items()}


def _lerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    # equal entries stay as they are: an infinite activation cap (no cap) on both ends
    # would give inf - inf = NaN in between
    return torch.where(a == b, b, torch.lerp(a, b, alpha))
