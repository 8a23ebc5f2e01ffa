"""``datafree``: data-free dense depth distillation (Hu et al., METHODS.md section 1).

Per iteration (Algorithm 1): x from the simulated set; x_mix by object-wise
mixing (Eq. 8); the student minimises (Eq. 10)

    L_S = L_depth(S(x), T(x)) + L_depth(S(G(x_mix)), T(G(x_mix)))

with G's output detached, and G minimises (Eq. 7/9)

    L_G = beta * L_bn(G(x_mix)) + alpha * ||G(x_mix) - x_mix||_1.

Order: Algorithm 1 updates S, then G. The Trainer steps G (``loss_g``) first,
then S; this is the same update because both losses are computed in one
``step`` from the same parameters, L_G does not depend on S, and L_S sees G's
output detached (computed before G's step), exactly the G(x_mix) Algorithm 1's
student step uses. The teacher runs once on G(x_mix): its depth is the
student's target and its BN inputs (forward hooks) give L_bn.

Ablations (``method_kwargs``): ``recon: false`` drops the alpha term;
``use_g: false`` distils on x_mix directly (no G; the only mode an ONNX or
other gradient-free teacher supports); ``mixing: false`` feeds x to G;
``kd_on_gx: true`` adds L_depth(S(G(x)), T(G(x))).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from depthkd_core.data.mixing import ObjectMixer
from depthkd_core.losses.bn_stats import BatchNormStatsLoss, batchnorm_layers
from depthkd_core.methods.base import METHODS
from depthkd_core.methods.base import DistillMethod
from depthkd_core.methods.config import DistillConfig
from depthkd_core.models import Teacher
from depthkd_core.models.transform_net import TransformationNet
from depthkd_core.train.trainer import build_optimizer


@dataclass
class DatafreeConfig:
    """alpha / beta: reconstruction / BN weights of L_G (paper: both 1e-3).
    lr_g: G's Adam rate (paper 1e-4; G follows the student's schedule).
    recon, use_g, mixing, kd_on_gx: the ablation switches (module docstring).
    mix_fraction: share of the classes taken from x_a (paper: half).
    g_channels, g_dilations, g_init_scale: TransformationNet architecture."""

    alpha: float = 1e-3
    beta: float = 1e-3
    lr_g: float = 1e-4
    recon: bool = True
    use_g: bool = True
    mixing: bool = True
    kd_on_gx: bool = False
    mix_fraction: float = 0.5
    g_channels: tuple[int, ...] = (32, 64, 128)
    g_dilations: tuple[int, ...] = (2, 4, 8)
    g_init_scale: float = 1e-3

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0 or self.lr_g <= 0:
            raise ValueError(f"datafree needs alpha, beta >= 0 and lr_g > 0, got alpha={self.alpha}, "
                             f"beta={self.beta}, lr_g={self.lr_g}")
        if self.kd_on_gx and not self.use_g:
            raise ValueError("datafree: kd_on_gx needs use_g: true (there is no G(x) without G)")
        self.g_channels, self.g_dilations = tuple(self.g_channels), tuple(self.g_dilations)


def check_g_teacher(teacher: Teacher) -> BatchNormStatsLoss:
    """BN-statistics loss on ``teacher``, or ValueError naming the mixing-only fallback."""
    module = teacher.module
    reason = None
    if module is None or not teacher.differentiable:
        reason = ("has no PyTorch module with gradients (e.g. a cached teacher; an ONNX file has "
                  "its BatchNorm folded into the convolutions, so its statistics are gone)")
    elif not batchnorm_layers(module):
        reason = "has no BatchNorm layers with running statistics"
    if reason is not None:
        raise ValueError(f"datafree with use_g: true needs a teacher with BatchNorm statistics and "
                         f"gradients to train the transformation network G; teacher "
                         f"'{teacher.name}' {reason}. Fall back to mixing-only distillation: "
                         "set `use_g: false` (method_kwargs.use_g=false)")
    return BatchNormStatsLoss(module)


def transform_objective(images: Tensor, source: Tensor, teacher: Teacher, bn_loss: BatchNormStatsLoss,
                        opts: DatafreeConfig) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """L_G of Eq. 7/9 for transformed ``images`` of ``source``: (loss, T(images), terms).

    One teacher forward gives both the depth (a target, for the student) and
    the BN statistics. Shared by G's training and per-batch input optimisation.
    """
    with bn_loss.recording():
        depth = teacher(images)
    bn = bn_loss()
    recon = (images - source).abs().mean()
    loss = opts.beta * bn + (opts.alpha * recon if opts.recon else 0.0)
    return loss, depth, {"bn": bn.detach(), "recon": recon.detach()}


@METHODS.register("datafree")
class Datafree(DistillMethod):
    """Eq. 10 for the student ("loss"), Eq. 9 for G ("loss_g") when ``use_g``."""

    Config = DatafreeConfig

    def __init__(self, teacher: Teacher, student: nn.Module, cfg: DistillConfig) -> None:
        super().__init__(teacher, student, cfg)
        opts = self.options
        self.mixer = ObjectMixer(opts.mix_fraction) if opts.mixing else None
        self.g: TransformationNet | None = None
        if opts.use_g:
            self.bn_loss = check_g_teacher(teacher)
            self.g = TransformationNet(opts.g_channels, opts.g_dilations, opts.g_init_scale)
            self.opt_g = build_optimizer(self.g.parameters(), replace(cfg.optim, lr=opts.lr_g))

    def extra_optimizers(self) -> dict[str, Optimizer]:
        return {"loss_g": self.opt_g} if self.g is not None else {}

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"transform": self.g} if self.g is not None else {}

    def augment(self, batch: dict[str, Any]) -> Tensor:
        """x_mix (Eq. 8), or x itself with mixing off. Depth is never touched."""
        if self.mixer is None:
            return batch["image"]
        return self.mixer(batch["image"], batch["semantic"]).images

    def transform_losses(self, x_aug: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """G(x_aug), T(G(x_aug)) and L_G with its terms (one teacher forward)."""
        assert self.g is not None
        gx = self.g(x_aug)
        loss_g, t_gx, terms = transform_objective(gx, x_aug, self.teacher, self.bn_loss, self.options)
        return gx, t_gx, {"loss_g": loss_g, **terms}

    def step(self, student: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        x = batch["image"]
        kd_x = self.kd(student, x)
        x_aug = self.augment(batch)
        if self.g is None:
            kd_aug = self.kd(student, x_aug)
            return {"loss": kd_x + kd_aug, "kd_x": kd_x.detach(), "kd_aug": kd_aug.detach()}
        gx, t_gx, g_losses = self.transform_losses(x_aug)
        kd_aug = self.kd(student, gx.detach(), t_gx)
        loss = kd_x + kd_aug
        out = {"kd_x": kd_x.detach(), "kd_aug": kd_aug.detach(), **g_losses}
        if self.options.kd_on_gx:
            with torch.no_grad():
                g_plain = self.g(x)
            kd_gx = self.kd(student, g_plain)
            loss = loss + kd_gx
            out["kd_gx"] = kd_gx.detach()
        return {"loss": loss, **out}
