"""On-robot label-free distillation: keyframe store, fine-tuning round, validation gate.

Importing this package never imports torch: ``keyframes`` (numpy + OpenCV) is used by the
ROS node's camera callback; ``finetune`` and ``gate`` import torch and are imported by
their full module names. docs/online.md describes the store layout, the round and the gate.
"""

from __future__ import annotations

from depthkd_core.online.keyframes import (
    KeyframeSelector,
    KeyframeStore,
    StoreFullError,
)

__all__ = ["KeyframeSelector", "KeyframeStore", "StoreFullError"]
