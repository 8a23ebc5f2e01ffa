"""``kd_ood``: plain KD on out-of-distribution (simulated) images (first term of Eq. 10).

``L = L_depth(S(x), T(x))`` with x from the transfer set (Hu et al., data-free
distillation, the "KD-OOD" baseline of Table II).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from depthkd_core.methods import METHODS
from depthkd_core.methods.base import DistillMethod


@METHODS.register("kd_ood")
class KdOod(DistillMethod):
    """Student learns the teacher's depth on the transfer images as they are."""

    def step(self, student: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        return {"loss": self.kd(student, batch["image"])}
