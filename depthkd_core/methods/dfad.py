"""``dfad``: data-free adversarial distillation (Fang et al. 2019), the DFAD baseline of Table II.

A generator maps noise z to images; it *maximises* the teacher-student
discrepancy ``|T(G(z)) - S(G(z))|_1`` while the student minimises it. Both
losses are computed from the same z at the same parameters and each network
takes one step per iteration (the Trainer steps the generator first, but the
student's loss uses the generator's images detached and computed before that
step, so the order does not change either update). The generator is trained
through the teacher, so the teacher must be a differentiable torch model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from depthkd_core.methods.base import METHODS
from depthkd_core.methods.base import DistillMethod, require_torch_teacher
from depthkd_core.methods.config import DistillConfig
from depthkd_core.models import Teacher
from depthkd_core.train.trainer import build_optimizer


@dataclass
class DfadConfig:
    """z_dim: noise size; channels: generator width; lr_g: generator Adam rate
    (DFAD's 1e-3; it follows the student's schedule)."""

    z_dim: int = 128
    channels: int = 64
    lr_g: float = 1e-3

    def __post_init__(self) -> None:
        if self.z_dim < 1 or self.channels < 1 or self.lr_g <= 0:
            raise ValueError(f"dfad needs z_dim, channels >= 1 and lr_g > 0, got {self}")


class Generator(nn.Module):
    """DCGAN-like: z -> (B,3,H,W) in [0,1] via three x2 upsampling stages (H, W multiples of 8)."""

    def __init__(self, z_dim: int, height: int, width: int, channels: int = 64) -> None:
        super().__init__()
        if height % 8 or width % 8:
            raise ValueError(f"generator output size must be a multiple of 8, got {height}x{width}")
        self.base = (channels * 2, height // 8, width // 8)
        self.project = nn.Sequential(nn.Linear(z_dim, channels * 2 * (height // 8) * (width // 8)),
                                     nn.BatchNorm1d(channels * 2 * (height // 8) * (width // 8)))

        def up(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(cin, cout, 3, padding=1),
                                 nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True))

        self.body = nn.Sequential(up(channels * 2, channels * 2), up(channels * 2, channels),
                                  up(channels, channels), nn.Conv2d(channels, 3, 3, padding=1),
                                  nn.Sigmoid())

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.project(z).view(z.shape[0], *self.base))


@METHODS.register("dfad")
class Dfad(DistillMethod):
    """Adversarial min-max on the L1 discrepancy; losses "loss" (student) and "loss_g"."""

    Config = DfadConfig
    uses_data = False
    teacher_gradients = True

    def __init__(self, teacher: Teacher, student: nn.Module, cfg: DistillConfig) -> None:
        super().__init__(teacher, student, cfg)
        require_torch_teacher(teacher, "dfad", "the generator is trained through the teacher")
        opts = self.options
        self.generator = Generator(opts.z_dim, cfg.data.height, cfg.data.width, opts.channels)
        self.opt_g = build_optimizer(self.generator.parameters(), replace(cfg.optim, lr=opts.lr_g))

    def extra_optimizers(self) -> dict[str, Optimizer]:
        return {"loss_g": self.opt_g}

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def step(self, student: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        index = batch["index"]
        z = torch.randn(index.shape[0], self.options.z_dim, device=index.device)
        images = self.generator(z)
        t_depth = self.teacher(images)  # keeps the graph to the images
        discrepancy = (t_depth - student(images)).abs().mean()
        fixed = images.detach()
        loss = (t_depth.detach() - student(fixed)).abs().mean()
        return {"loss": loss, "loss_g": -discrepancy, "discrepancy": discrepancy.detach()}
