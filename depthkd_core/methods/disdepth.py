"""``disdepth``: cross-architecture KD from a transformer into a CNN (DisDepth, METHODS.md s.3).

Per step (Algorithm 1 of the paper), on images x:

1. the ghost decoder (a frozen copy of the student's decoder + head) is
   re-synchronised from the student;
2. the frozen teacher (timm Swin/ViT DepthNet) gives its stage features
   (``forward_dict``) and depth, without a graph;
3. FAMs acclimate each teacher stage, a 1x1 projection maps it to the
   student's channels at the student's feature size, LAM scores a_i weight it;
4. the ghost decoder turns those features into depth: L_task(ghost) trains
   the FAMs, projections and LAMs only ("loss_aux", their own optimiser);
5. the student: L_task(S) + lambda_kd * L_akd(F^S, F^T, a) ("loss"), with the
   teacher features and scores detached, KD only after the warm-up.

So ``L = L_task(S) + L_task(ghost) + lambda_kd * L_akd`` (logged as "total"),
each network stepping on its own terms. L_task is SILog (alpha 10, lambda
0.85) on ground truth where the batch has depth, else on the teacher's depth.

``use_fam: false`` is "KD without acclimation": raw teacher features, a
FitNets-style 1x1 regressor on the student side (student channels -> teacher
channels) trained on "loss_aux" with the student detached, plain feature MSE.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from depthkd_core.losses import build_loss
from depthkd_core.methods.base import METHODS
from depthkd_core.methods.base import DistillMethod
from depthkd_core.methods.config import DistillConfig
from depthkd_core.models import DepthNet, Teacher
from depthkd_core.models.encoders import _family
from depthkd_core.models.fam import FeatureAcclimation, GhostDecoder, nearest_stage
from depthkd_core.models.teacher_base import resize
from depthkd_core.train.trainer import build_optimizer

AUX = "loss_aux"


@dataclass
class DisdepthConfig:
    """lambda_kd: KD weight (paper 0.05, Table 7).
    warmup_fraction: share of max_steps before KD starts (paper: 7 of 25 epochs = 0.28).
    silog_alpha, silog_lambda: the task loss (paper: 10, 0.85).
    use_fam, use_lam: ablations (no acclimation / FAM / FAM+LAM; Table 4).
    use_labels: SILog on ground truth where the batch has depth; false: always the teacher's depth.
    lr_aux: Adam rate of the FAMs/projections/LAMs (or the regressor); they follow optim's schedule.
    fam_heads, fam_window: each FAM's Swin block; lam_dim: LAM query/key width."""

    lambda_kd: float = 0.05
    warmup_fraction: float = 7 / 25
    silog_alpha: float = 10.0
    silog_lambda: float = 0.85
    use_fam: bool = True
    use_lam: bool = True
    use_labels: bool = True
    lr_aux: float = 1e-4
    fam_heads: int = 4
    fam_window: int = 7
    lam_dim: int = 64

    def __post_init__(self) -> None:
        if self.lambda_kd < 0 or not 0.0 <= self.warmup_fraction <= 1.0 or self.lr_aux <= 0:
            raise ValueError(f"disdepth needs lambda_kd >= 0, 0 <= warmup_fraction <= 1 and "
                             f"lr_aux > 0, got {self.lambda_kd}, {self.warmup_fraction}, {self.lr_aux}")
        if self.use_lam and not self.use_fam:
            raise ValueError("disdepth: use_lam needs use_fam: true (LAM is trained through the "
                             "ghost decoder, which only the acclimated path has)")


def check_transformer_teacher(teacher: Teacher) -> DepthNet:
    """The teacher's DepthNet, or ValueError naming what is missing."""
    module = teacher.module
    if not isinstance(module, DepthNet):
        kind = type(module).__name__ if module is not None else "no torch module"
        raise ValueError(
            f"disdepth needs the teacher's encoder stage features for its feature acclimation "
            f"modules; teacher '{teacher.name}' ({type(teacher).__name__}, {kind}) only gives "
            "depth. Use a depthkd checkpoint of a transformer teacher, e.g. "
            "ModelConfig(name='teacher', encoder='swin_tiny_patch4_window7_224')")
    family = _family(module.cfg.encoder)
    if family not in ("swin", "vit"):
        raise ValueError(f"disdepth distils a transformer teacher (timm Swin or ViT) into a CNN; "
                         f"teacher '{teacher.name}' has the {family.upper()} encoder "
                         f"'{module.cfg.encoder}'")
    return module


def task_target(batch: dict[str, Any], teacher_depth: Tensor, use_labels: bool
                ) -> tuple[Tensor, Tensor]:
    """(target, mask): ground truth for images that have depth, the teacher's depth otherwise."""
    if not use_labels or "has_depth" not in batch:
        return teacher_depth, teacher_depth > 0
    labelled = batch["has_depth"].to(torch.bool).view(-1, 1, 1, 1)
    target = torch.where(labelled, batch["depth"], teacher_depth)
    mask = torch.where(labelled, batch["valid"], teacher_depth > 0)
    return target, mask


class Auxiliary(nn.Module):
    """What disdepth trains besides the student, plus its step count (checkpointed, so
    the warm-up survives --resume)."""

    def __init__(self, acclimation: nn.Module) -> None:
        super().__init__()
        self.acclimation = acclimation
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


def _regressor(student: DepthNet, teacher: DepthNet) -> nn.ModuleList:
    """FitNets hint regressors: per student level, 1x1 student C -> nearest teacher stage's C."""
    stage_of = nearest_stage(teacher.encoder.reductions, student.encoder.reductions)
    return nn.ModuleList([nn.Conv2d(c, teacher.encoder.channels[t], 1)
                          for c, t in zip(student.encoder.channels, stage_of)])


@METHODS.register("disdepth")
class DisDepth(DistillMethod):
    """L_task(S) + lambda_kd L_akd for the student ("loss"); L_task(ghost) for the FAMs
    ("loss_aux"), or the regressor's KD loss without acclimation."""

    Config = DisdepthConfig

    def __init__(self, teacher: Teacher, student: nn.Module, cfg: DistillConfig) -> None:
        super().__init__(teacher, student, cfg)
        opts = self.options
        self.teacher_net = check_transformer_teacher(teacher)
        if not isinstance(student, DepthNet) or _family(student.cfg.encoder) != "cnn":
            got = student.cfg.encoder if isinstance(student, DepthNet) else type(student).__name__
            raise ValueError(f"disdepth needs a CNN DepthNet student, got '{got}'")
        t_enc, s_enc = self.teacher_net.encoder, student.encoder
        self.stage_of = nearest_stage(t_enc.reductions, s_enc.reductions)
        if opts.use_fam:
            module: nn.Module = FeatureAcclimation(
                t_enc.channels, t_enc.reductions, s_enc.channels, s_enc.reductions,
                use_lam=opts.use_lam, heads=opts.fam_heads, window=opts.fam_window,
                lam_dim=opts.lam_dim)
            self.ghost: GhostDecoder | None = GhostDecoder(student)
        else:
            module, self.ghost = _regressor(student, self.teacher_net), None
        self.aux = Auxiliary(module)
        self.opt_aux = build_optimizer(module.parameters(), replace(cfg.optim, lr=opts.lr_aux))
        self.task_loss = build_loss("silog", alpha=opts.silog_alpha, lambd=opts.silog_lambda)
        self.akd_loss = build_loss("attentive_kd")
        self.warmup_steps = round(opts.warmup_fraction * cfg.max_steps)

    def extra_optimizers(self) -> dict[str, Optimizer]:
        return {AUX: self.opt_aux}

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"disdepth": self.aux}

    def kd_active(self) -> bool:
        """True once the warm-up (steps already taken >= warmup_steps) is over."""
        return int(self.aux.steps) >= self.warmup_steps

    def teacher_outputs(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """Frozen teacher's stage features and depth at the image size, without a graph."""
        size = self.teacher.input_size or tuple(images.shape[-2:])
        with torch.no_grad():
            out = self.teacher_net.forward_dict(resize(images, size))
        return out["features"], resize(out["depth"], tuple(images.shape[-2:]))

    def step(self, student: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        if student is not getattr(student, "module", student):
            raise ValueError("disdepth reads the student's features with forward_dict, which "
                             "bypasses DistributedDataParallel's gradient sync: run it in one "
                             "process, not under torchrun")
        net: DepthNet = student
        images = batch["image"]
        t_feats, t_depth = self.teacher_outputs(images)
        target, mask = task_target(batch, t_depth, self.options.use_labels)
        s_out = net.forward_dict(images)
        s_feats = s_out["features"]
        task_s = self.task_loss(s_out["depth"], target, mask)
        if self.ghost is not None:
            aux, akd, terms = self._acclimated(net, images, s_feats, t_feats, target, mask)
        else:
            aux, akd, terms = self._plain(s_feats, t_feats)
        weight = self.options.lambda_kd if self.kd_active() else 0.0
        self.aux.steps += 1
        loss = task_s + weight * akd
        total = task_s.detach() + terms.get("task_ghost", 0.0) + weight * akd.detach()
        return {"loss": loss, AUX: aux, "task_s": task_s.detach(), "akd": akd.detach(),
                "kd_weight": torch.tensor(weight), "total": total, **terms}

    def _acclimated(self, net: DepthNet, images: Tensor, s_feats: list[Tensor],
                    t_feats: list[Tensor], target: Tensor, mask: Tensor
                    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(L_task(ghost), L_akd with the teacher side detached, logged terms)."""
        assert self.ghost is not None
        self.ghost.to(images.device).sync(net)  # the Trainer moves only the student and extras
        sizes = [tuple(f.shape[-2:]) for f in s_feats]
        ghost_in, targets, scores = self.aux.acclimation(t_feats, sizes)
        ghost_depth = self.ghost(ghost_in, tuple(images.shape[-2:]))
        task_g = self.task_loss(ghost_depth, target, mask)
        akd = self.akd_loss(s_feats, [t.detach() for t in targets], [a.detach() for a in scores])
        return task_g, akd, {"task_ghost": task_g.detach()}

    def _plain(self, s_feats: list[Tensor], t_feats: list[Tensor]
               ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """KD without acclimation: (regressor loss on detached student, student's KD loss)."""
        regressor = self.aux.acclimation
        targets = [resize(t_feats[t], tuple(f.shape[-2:])) for t, f in zip(self.stage_of, s_feats)]
        # the student's term sees the regressor as a constant (a copy), so the aux
        # optimiser's in-place step, which runs first, cannot invalidate its graph
        hinted = [F.conv2d(f, r.weight.detach().clone(), r.bias.detach().clone())
                  for r, f in zip(regressor, s_feats)]
        akd = self.akd_loss(hinted, targets)
        reg_loss = self.akd_loss([r(f.detach()) for r, f in zip(regressor, s_feats)], targets)
        return reg_loss, akd, {}
