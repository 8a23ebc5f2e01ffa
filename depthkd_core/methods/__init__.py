"""Distillation methods: one module per method, each registered in ``METHODS``.

A method class is built as ``Method(teacher, student, cfg)`` (cfg a
``DistillConfig``) and exposes ``step(student, batch) -> {name: loss}`` for the
shared ``Trainer``; ``depthkd distill`` (``engine.py``) wires them together.
"""

from __future__ import annotations

from depthkd_core.registry import Registry

METHODS: Registry[type] = Registry("method")

# Imported for their registration side effect; METHODS must exist first.
from depthkd_core.methods import datafree, dfad, kd_ood, noise  # noqa: E402,F401
from depthkd_core.methods import labelfree, tiekd  # noqa: E402,F401
from depthkd_core.methods import disdepth  # noqa: E402,F401

__all__ = ["METHODS"]
