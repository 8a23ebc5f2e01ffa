"""``noise``: KD on Gaussian-noise images (the "Random noises" baseline of Table II)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from depthkd_core.methods.base import METHODS
from depthkd_core.methods.base import DistillMethod


@dataclass
class NoiseConfig:
    """Pixels ~ N(mean, std^2) per channel, clamped to [0, 1]."""

    mean: float = 0.5
    std: float = 0.25

    def __post_init__(self) -> None:
        if self.std <= 0:
            raise ValueError(f"noise std must be > 0, got {self.std}")


@METHODS.register("noise")
class NoiseKd(DistillMethod):
    """``L = L_depth(S(n), T(n))``, n fresh Gaussian noise every step; no data is read."""

    Config = NoiseConfig
    uses_data = False

    def images(self, batch_size: int, device: torch.device) -> Tensor:
        height, width = self.cfg.data.height, self.cfg.data.width
        noise = torch.randn(batch_size, 3, height, width, device=device)
        return (noise * self.options.std + self.options.mean).clamp(0.0, 1.0)

    def step(self, student: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        index = batch["index"]
        return {"loss": self.kd(student, self.images(index.shape[0], index.device))}
