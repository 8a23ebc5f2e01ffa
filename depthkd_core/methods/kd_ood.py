"""``kd_ood``: plain KD on out-of-distribution (simulated) images (first term of Eq. 10).

``L = L_depth(S(x), T(x))`` with x from the transfer set (Hu et al., data-free
distillation, the "KD-OOD" baseline of Table II). ``label_weight`` w > 0 adds the
transfer set's own labels, ``+ w * L_depth(S(x), D(x))`` (a simulator renders
depth with every image): both signals, where the teacher and the labels may
disagree about the same image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from depthkd_core.methods.base import METHODS
from depthkd_core.methods.base import DistillMethod


@dataclass
class KdOodConfig:
    """label_weight: weight of the supervised term on the transfer set's depth (0: pure KD)."""

    label_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.label_weight < 0:
            raise ValueError(f"kd_ood label_weight must be >= 0, got {self.label_weight}")


@METHODS.register("kd_ood")
class KdOod(DistillMethod):
    """Student learns the teacher's depth on the transfer images as they are."""

    Config = KdOodConfig

    def step(self, student: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        images = batch["image"]
        if self.options.label_weight == 0:
            return {"loss": self.kd(student, images)}
        if not bool(batch["has_depth"].all()):
            raise ValueError("kd_ood with label_weight > 0 needs depth for every transfer image "
                             "(a reader with ground truth, e.g. sim)")
        pred = student(images)
        target = self.teacher_depth(images)
        kd = self.kd_loss(pred, target, target > 0)
        label = self.kd_loss(pred, batch["depth"], batch["valid"] & (batch["depth"] > 0))
        return {"loss": kd + self.options.label_weight * label, "kd": kd.detach(),
                "label": label.detach()}
