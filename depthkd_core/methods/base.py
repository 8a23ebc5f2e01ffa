"""What every distillation method shares: its config, the teacher and the KD term."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from depthkd_core.config import from_dict
from depthkd_core.losses import build_loss
from depthkd_core.methods.config import DistillConfig
from depthkd_core.models import Teacher
from depthkd_core.registry import Registry

# Every method class registers itself here (``depthkd_core.methods`` imports them all).
METHODS: Registry[type] = Registry("method")


@dataclass
class NoOptions:
    """A method without hyper-parameters of its own."""


class DistillMethod:
    """Base of the ``METHODS`` entries.

    Subclasses set ``Config`` (their ``method_kwargs`` dataclass), ``uses_data``
    (False: the method makes its own images and never reads ``data.root``),
    ``teacher_gradients`` (True: it trains through the teacher, so an ONNX teacher is
    loaded as a converted torch module) and implement ``step``. ``extra_optimizers`` / ``extra_modules`` go to the
    ``Trainer``: each extra optimiser steps on the loss of the same name.
    """

    Config: ClassVar[type] = NoOptions
    uses_data: ClassVar[bool] = True
    teacher_gradients: ClassVar[bool] = False

    def __init__(self, teacher: Teacher, student: nn.Module, cfg: DistillConfig) -> None:
        self.teacher, self.cfg = teacher, cfg
        self.options: Any = from_dict(self.Config, cfg.method_kwargs, "method_kwargs")
        self.kd_loss = build_loss(cfg.loss, **cfg.loss_kwargs)

    def step(self, student: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    def extra_optimizers(self) -> dict[str, Optimizer]:
        return {}

    def extra_modules(self) -> dict[str, nn.Module]:
        return {}

    def teacher_depth(self, images: Tensor) -> Tensor:
        """T(x) as a target: no graph."""
        with torch.no_grad():
            return self.teacher(images)

    def kd(self, student: nn.Module, images: Tensor, target: Tensor | None = None) -> Tensor:
        """L_depth(S(x), T(x)) (the KD term of Eq. 10); ``target``: a precomputed T(x)."""
        target = self.teacher_depth(images) if target is None else target.detach()
        return self.kd_loss(student(images), target, target > 0)


def require_torch_teacher(teacher: Teacher, method: str, why: str) -> nn.Module:
    """The teacher's module, or ValueError when it is not a differentiable torch model."""
    if teacher.module is None or not teacher.differentiable:
        raise ValueError(f"{method} needs a differentiable PyTorch teacher ({why}); teacher "
                         f"'{teacher.name}' ({type(teacher).__name__}) has no torch module with "
                         "gradients (e.g. ONNX or cached)")
    return teacher.module
