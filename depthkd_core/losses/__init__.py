"""Depth losses: one loss per module, each registered in ``LOSSES``.

Every loss is an ``nn.Module`` called as ``loss(pred, target, mask=None)`` with
``pred``/``target`` (B,1,H,W) depth and ``mask`` a bool (B,1,H,W) of pixels to
use (``None``: all pixels). It returns a scalar tensor.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from depthkd_core.registry import Registry

LOSSES: Registry[type[nn.Module]] = Registry("loss")


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the loss registered as ``name`` with ``kwargs``."""
    return LOSSES.get(name)(**kwargs)


# Imported for their registration side effect; LOSSES must exist first.
from depthkd_core.losses import hu_depth, l1, mse, silog  # noqa: E402,F401
from depthkd_core.losses import bn_stats  # noqa: E402,F401
from depthkd_core.losses import cwd, ssim  # noqa: E402,F401
from depthkd_core.losses import attentive_kd  # noqa: E402,F401

__all__ = ["LOSSES", "build_loss"]
