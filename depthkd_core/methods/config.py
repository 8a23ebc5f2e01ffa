"""``DistillConfig``: one distillation run (config/distill/*.yaml maps onto it).

It extends ``TrainConfig`` (data = the transfer images, model = the student,
optim = the student's optimiser and the schedule every optimiser shares), so
the shared ``Trainer`` runs it unchanged. Defaults follow the data-free paper
(Hu et al., Sec. IV-A): Adam, lr 1e-4 halved every 5 epochs, batch 8, 20 epochs.
With its 50K SceneNet images one epoch is 6250 steps: step_size 31250, max_steps 125000.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from depthkd_core.config import load_config
from depthkd_core.models.teachers import output_flags
from depthkd_core.train.config import OptimConfig, TrainConfig

# Epochs of the paper at its 50K images and batch 8.
PAPER_STEPS_PER_EPOCH = 50_000 // 8


def paper_optim() -> OptimConfig:
    """Adam 1e-4, halved every 5 epochs; the paper's weight decay was lost in extraction (0 here)."""
    return OptimConfig(optimizer="adam", lr=1e-4, weight_decay=0.0, batch_size=8, scheduler="step",
                       step_size=5 * PAPER_STEPS_PER_EPOCH, gamma=0.5)


@dataclass
class DistillConfig(TrainConfig):
    """A ``TrainConfig`` plus the teacher and the method.

    teacher: a path load_teacher opens (depthkd checkpoint, TorchScript, .onnx, HF folder).
    teacher_output: what an ONNX/TorchScript teacher predicts: auto (= metric) | metric |
    relative | relative_inverse (affine-invariant disparity, as MiDaS/Depth Anything exports).
    method: key in ``METHODS`` (`depthkd list methods` prints each with its options).
    method_kwargs: that method's ``Config`` fields; the saved config.yaml lists all of them.
    loss / loss_kwargs: L_depth between student and teacher depth (Hu et al. 2019, a = 0.5).
    """

    loss: str = "hu_depth"
    loss_kwargs: dict[str, Any] = field(default_factory=lambda: {"a": 0.5})
    optim: OptimConfig = field(default_factory=paper_optim)
    max_steps: int = 20 * PAPER_STEPS_PER_EPOCH
    out_dir: str = "runs/distill"
    teacher: str = ""
    teacher_output: str = "auto"
    method: str = "datafree"
    method_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.teacher:
            raise ValueError("teacher must name a teacher model (checkpoint, TorchScript, "
                             ".onnx or Hugging Face folder)")
        output_flags(self.teacher_output)


def load_distill_config(path: str | Path | None, overrides: list[str] | None = None) -> DistillConfig:
    """DistillConfig from a YAML file plus ``key=value`` overrides."""
    return load_config(DistillConfig, path, overrides)
