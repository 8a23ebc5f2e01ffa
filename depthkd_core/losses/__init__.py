"""Depth losses: one loss per module, each registered in ``LOSSES``.

Every loss is an ``nn.Module`` called as ``loss(pred, target, mask=None)`` with
``pred``/``target`` (B,1,H,W) depth and ``mask`` a bool (B,1,H,W) of pixels to
use (``None``: all pixels). It returns a scalar tensor.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# imported for their registration in LOSSES
from depthkd_core.losses import (  # noqa: F401
    attentive_kd, bn_stats, cwd, hu_depth, l1, log_l1, mse, silog, ssim)
from depthkd_core.losses.common import LOSSES


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the loss registered as ``name`` with ``kwargs``."""
    return LOSSES.get(name)(**kwargs)


__all__ = ["LOSSES", "build_loss"]
