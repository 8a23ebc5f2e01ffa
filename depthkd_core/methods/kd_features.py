"""``kd_features``: ``kd_ood`` plus hints from the teacher's own feature maps (FitNets,
Romero et al. 2015), for a FastDepth student of the teacher's own widths.

``L = L_depth(S(x), T(x)) + w * mean_l |F_S^l(x) - P(F_T^l(x))|^2 / |P(F_T^l(x))|^2``

over the named feature maps l (``E0..E13`` the encoder's, ``D1..D5`` the decoder's), P
area-pooling the teacher's map to the student's grid. The student that needs it is the
teacher run at a smaller input (the packaged student: FastDepth whole at 160x160): channel
for channel it is the same network, so its maps can be held to the teacher's directly, no
adapter in between. Output-only KD fits the teacher's depth on the transfer images; the
hints also ask for the teacher's reasons, in the deep maps where the global context (and
with it the scale of the whole image) is decided, in the hope that those carry over to
images unlike the transfer set better than the output alone does.

The teacher file's weights run in depthkd's own FastDepth at the teacher's input size
(``import_onnx_weights``: the same depth as the file to 5e-7 m, tested), which gives the
depth target and the maps in one pass (the file's own Teacher gives only its input size);
a teacher that is not a FastDepth file of the student's widths is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from depthkd_core.methods.base import METHODS, DistillMethod
from depthkd_core.methods.config import DistillConfig
from depthkd_core.models import Teacher, build_model
from depthkd_core.models.config import FASTDEPTH_DECODER_STAGES
from depthkd_core.models.fastdepth import (DECODER_CHANNELS, ENCODER_CHANNELS, FastDepthNet,
                                           named_maps)

FEATURE_NAMES = (*(f"E{i}" for i in range(len(ENCODER_CHANNELS))),
                 *(f"D{s}" for s in range(1, len(DECODER_CHANNELS) + 1)))


@dataclass
class KdFeaturesConfig:
    """weight: w, the hints' weight against the depth term (no paper default: 1 puts the
    relative error of the maps on the scale of the SILog term at the start).
    layers: the maps held to the teacher's (default: the deepest encoder map, stride 32,
    and the first two decoder maps, strides 16 and 8)."""

    weight: float = 1.0
    layers: tuple[str, ...] = ("E13", "D1", "D2")

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        if self.weight < 0:
            raise ValueError(f"kd_features weight must be >= 0, got {self.weight}")
        unknown = [name for name in self.layers if name not in FEATURE_NAMES]
        if not self.layers or unknown:
            raise ValueError(f"kd_features layers must be a non-empty list of {FEATURE_NAMES}, "
                             f"got {list(self.layers)}")


def feature_maps(out: dict[str, Any], layers: tuple[str, ...]) -> list[Tensor]:
    """The maps ``layers`` (``named_maps`` names) of a ``FastDepthNet.forward_dict`` result."""
    named = named_maps(out)
    return [named[name] for name in layers]


def hint_loss(student_maps: list[Tensor], teacher_maps: list[Tensor]) -> Tensor:
    """Mean over maps of the student's squared error against the teacher's map (area-pooled
    to the student's grid), relative to that map's energy."""
    terms = []
    for s, t in zip(student_maps, teacher_maps):
        t = F.adaptive_avg_pool2d(t, s.shape[-2:])
        terms.append((s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12))
    return torch.stack(terms).mean()


@METHODS.register("kd_features")
class KdFeatures(DistillMethod):
    """Student learns the teacher's depth and its named feature maps on the transfer images."""

    Config = KdFeaturesConfig

    def __init__(self, teacher: Teacher, student: nn.Module, cfg: DistillConfig) -> None:
        super().__init__(teacher, student, cfg)
        if not isinstance(student, FastDepthNet):
            raise ValueError(f"kd_features needs a fastdepth student, got '{cfg.model.name}'")
        absent = [name for name in self.options.layers
                  if name.startswith("D") and int(name[1:]) > cfg.model.decoder_stages]
        if absent:
            raise ValueError(f"kd_features layers {absent}: the student's decoder stops after "
                             f"stage {cfg.model.decoder_stages} (model.decoder_stages)")
        try:
            # the teacher file is the whole network, whatever the student keeps of it
            module = build_model(replace(cfg.model, pretrained=cfg.teacher,
                                         input_size=teacher.input_size,
                                         decoder_stages=FASTDEPTH_DECODER_STAGES))
        except ValueError as exc:
            raise ValueError(f"kd_features needs a FastDepth teacher file of the student's own "
                             f"widths ({cfg.teacher}): {exc}") from None
        self.feature_teacher = module.to(cfg.device).eval().requires_grad_(False)

    def step(self, student: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        images = batch["image"]
        with torch.no_grad():
            target = self.feature_teacher.forward_dict(images)
        out = student.forward_dict(images)
        depth = target["depth"]
        kd = self.kd_loss(out["depth"], depth, depth > 0)
        hints = hint_loss(feature_maps(out, self.options.layers),
                          feature_maps(target, self.options.layers))
        return {"loss": kd + self.options.weight * hints, "kd": kd.detach(), "hints": hints.detach()}
