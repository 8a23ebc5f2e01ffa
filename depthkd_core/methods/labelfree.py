"""``labelfree``: label-free distillation of Gao et al. (METHODS.md s.2).

``L = w_cwd * l_cwd + w_geo * l_geod (+ w_mse * MSE)`` on unlabelled images
(any reader: ``images`` folders, ``rosbag`` image topics, ...); depth labels are
never read. The teacher may be metric or relative (``is_metric`` False; inverse
depth when ``is_inverse``).

Relative teachers. CWD runs in the teacher's own space (the student's depth is
inverted for a disparity teacher) and is shift/scale invariant through the
per-image normalisation. The MSE term is the scale-and-shift-invariant MSE of
MiDaS in the teacher's space: the student aligned to the teacher per image by
least squares, the residual over the teacher's variance (1 for a flat student, 0
for any affine copy of the teacher). The geometric term needs depth: the
teacher's map is aligned per image to the (detached) student's, in the teacher's
space, by least squares scale+shift (default) or median scale, then inverted for
disparity teachers and clamped to the student's depth range; both maps are then
divided by the student's mean depth (in the graph). Why align the teacher to the
student: relative depth carries only shape, and an arbitrary normalisation would
impose a metric scale the student cannot know. Why divide: the target follows
the student's scale, so a loss in metres falls when the student shrinks and its
gradient shrinks it (the benchmark found such students near min_depth); in units
of the student's own mean depth the loss is scale-invariant and its gradient has
no component along the student's scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from depthkd_core.losses.cwd import NORMALISATIONS, ChannelWiseDistillation
from depthkd_core.losses.geometric import GeometricDistillation, fill_intrinsics
from depthkd_core.losses.mse import MSELoss
from depthkd_core.methods.base import METHODS
from depthkd_core.methods.base import DistillMethod
from depthkd_core.methods.config import DistillConfig
from depthkd_core.models import Teacher

LOG = logging.getLogger(__name__)
ALIGNMENTS = ("lsq", "median")


@dataclass
class LabelfreeConfig:
    """Loss weights and options of Gao et al.; values lost in extraction are marked.

    tau: CWD temperature (not in the extracted paper; depth is normalised to unit
    spread, so 1 keeps the softmax neither flat nor one-hot).
    n_points: pixels sampled for the PointNet (not in the extracted paper).
    pointnet_weights: a state-dict file; None: random weights from pointnet_seed.
    alignment: relative teacher -> depth for the geometric/MSE terms (lsq | median).
    default_fx: fx = fy = default_fx * width for frames without intrinsics
    (0.8: about NYU/TUM's 518-525 px at 640 wide).
    """

    w_cwd: float = 1.0
    w_geo: float = 1.0
    w_mse: float = 0.0
    tau: float = 1.0
    normalisation: str = "median_mad"
    n_points: int = 1024
    pointnet_seed: int = 0
    pointnet_weights: str | None = None
    alignment: str = "lsq"
    default_fx: float = 0.8

    def __post_init__(self) -> None:
        weights = (self.w_cwd, self.w_geo, self.w_mse)
        if min(weights) < 0 or max(weights) == 0:
            raise ValueError(f"labelfree weights w_cwd, w_geo, w_mse must be >= 0 and not all 0, "
                             f"got {weights}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got '{self.normalisation}'")
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got '{self.alignment}'")
        if self.default_fx <= 0:
            raise ValueError(f"default_fx must be > 0 (a fraction of the width), got {self.default_fx}")


def align_to(source: Tensor, ref: Tensor, mode: str, eps: float = 1e-8) -> Tensor:
    """Per image, ``s * source + t`` fitted to ``ref`` over all pixels (B,1,H,W).

    lsq: least squares ``argmin_{s,t} sum (s source + t - ref)^2``; median: ``t = 0``,
    ``s = median(ref) / median(source)``. Shape-preserving (no Python loop over images).
    """
    src, dst = source.flatten(1), ref.flatten(1)
    if mode == "median":
        scale = dst.median(dim=1, keepdim=True).values / src.median(dim=1, keepdim=True).values.clamp(min=eps)
        return (scale * src).view_as(source)
    src_c = src - src.mean(dim=1, keepdim=True)
    scale = (src_c * (dst - dst.mean(dim=1, keepdim=True))).mean(1, keepdim=True) \
        / (src_c ** 2).mean(1, keepdim=True).clamp(min=eps)
    shift = dst.mean(dim=1, keepdim=True) - scale * src.mean(dim=1, keepdim=True)
    return (scale * src + shift).view_as(source)


def ssi_mse(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """Scale-and-shift-invariant MSE (MiDaS): per image, ``pred`` aligned to ``target`` by
    least squares (gradients through the fit), the mean squared residual over the
    target's variance; averaged over the batch. 1 for a flat ``pred``, 0 for an affine copy."""
    residual = (align_to(pred, target, "lsq") - target).flatten(1).pow(2).mean(dim=1)
    variance = target.flatten(1).var(dim=1, unbiased=False).clamp(min=eps)
    return (residual / variance).mean()


@METHODS.register("labelfree")
class Labelfree(DistillMethod):
    """CWD + geometric distillation from unlabelled images (Gao et al.)."""

    Config = LabelfreeConfig

    def __init__(self, teacher: Teacher, student: nn.Module, cfg: DistillConfig) -> None:
        super().__init__(teacher, student, cfg)
        opts = self.options
        self.cwd = ChannelWiseDistillation(opts.tau, opts.normalisation)
        self.geometric = GeometricDistillation(opts.n_points, opts.pointnet_seed,
                                               opts.pointnet_weights).to(cfg.device)
        self.mse = MSELoss()
        self.depth_range = (cfg.model.min_depth, cfg.model.max_depth)
        self._warned_intrinsics = False
        if not teacher.is_metric:
            LOG.info("labelfree: relative teacher %s (%s); geometric/MSE terms use it %s-aligned "
                     "to the student per image", teacher.name,
                     "inverse depth" if teacher.is_inverse else "depth", opts.alignment)

    def teacher_space(self, student_depth: Tensor) -> Tensor:
        """The student's depth in the teacher's output space (inverse for disparity teachers)."""
        if self.teacher.is_inverse:
            return 1.0 / student_depth.clamp(min=self.depth_range[0])
        return student_depth

    def depth_target(self, teacher_out: Tensor, student_depth: Tensor) -> Tensor:
        """Teacher output as depth in the student's range (aligned if relative); no graph."""
        low, high = self.depth_range
        if self.teacher.is_metric:
            return teacher_out.clamp(low, high)
        aligned = align_to(teacher_out, self.teacher_space(student_depth.detach()), self.options.alignment)
        if self.teacher.is_inverse:
            return 1.0 / aligned.clamp(1.0 / high, 1.0 / low)
        return aligned.clamp(low, high)

    def intrinsics(self, batch: dict[str, Any], height: int, width: int, device: torch.device) -> Tensor:
        size = batch["image"].shape[0]
        given = batch.get("intrinsics", torch.zeros(size, 4)).to(device, torch.float32)
        filled, missing = fill_intrinsics(given, height, width, self.options.default_fx)
        if missing and not self._warned_intrinsics:
            LOG.warning("labelfree: frames without intrinsics; using the default camera fx = fy = "
                        "%.3g * width = %.1f px, principal point at the image centre "
                        "(method_kwargs.default_fx)", self.options.default_fx,
                        self.options.default_fx * width)
            self._warned_intrinsics = True
        return filled

    def step(self, student: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        images, opts = batch["image"], self.options
        teacher_out = self.teacher_depth(images)
        depth = student(images)
        terms: dict[str, Tensor] = {}
        if opts.w_cwd > 0:
            terms["cwd"] = self.cwd(self.teacher_space(depth), teacher_out)
        metric = self.teacher.is_metric
        if opts.w_geo > 0 or (opts.w_mse > 0 and metric):
            target = self.depth_target(teacher_out, depth)
        if opts.w_geo > 0:
            K = self.intrinsics(batch, depth.shape[-2], depth.shape[-1], depth.device)
            student_pts, teacher_pts = depth, target
            if not metric:  # in units of the student's mean depth: scale-invariant
                unit = depth.mean(dim=(1, 2, 3), keepdim=True)
                student_pts, teacher_pts = depth / unit, target / unit
            geo = self.geometric(student_pts, teacher_pts, K)
            terms.update({"geo": geo["total"], "geo_input": geo["input"],
                          "geo_feature": geo["feature"], "geo_global": geo["global"]})
        if opts.w_mse > 0:
            terms["mse"] = (self.mse(depth, target) if metric
                            else ssi_mse(self.teacher_space(depth), teacher_out))
        weights = {"cwd": opts.w_cwd, "geo": opts.w_geo, "mse": opts.w_mse}
        loss = sum(w * terms[name] for name, w in weights.items() if w > 0)
        return {"loss": loss, **terms}
