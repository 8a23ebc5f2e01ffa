"""Distillation methods: one module per method, each registered in ``METHODS``.

A method class is built as ``Method(teacher, student, cfg)`` (cfg a
``DistillConfig``) and exposes ``step(student, batch) -> {name: loss}`` for the
shared ``Trainer``; ``depthkd distill`` (``engine.py``) wires them together.
"""

from __future__ import annotations

# imported for their registration in METHODS
from depthkd_core.methods import (datafree, dfad, disdepth, kd_features, kd_ood, labelfree,  # noqa: F401
                                  noise, tiekd)
from depthkd_core.methods.base import METHODS

__all__ = ["METHODS"]
