"""DisDepth teacher-side modules (Sec. 3.3-3.4, METHODS.md section 3).

* ``FeatureAcclimation``: after each frozen teacher stage a feature acclimation
  module (FAM, one Swin transformer block, windowed so it fits any stage
  resolution), then per student feature level a 1x1 projection to the
  student's channels, resized (bilinear) to the student's feature size at that
  level. Each student level takes the teacher stage of the nearest stride
  (a stride-2 student level takes the stride-4 stage, upsampled).
* ``LossAttention`` (LAM): cross-attention, query = spatial mean of the
  acclimated feature, keys = its pixels; scores a_i = softmax over pixels.
  The feature fed to the ghost decoder is ``f_i * N a_i`` (N pixels, so uniform
  scores leave it unchanged) and a_i weights the attentive KD loss.
* ``GhostDecoder``: a frozen copy of the student's decoder + head, re-synced
  from the student before each use.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn


def nearest_stage(teacher_reductions: list[int], student_reductions: list[int]) -> list[int]:
    """For each student level, the teacher stage whose stride is nearest in log2."""
    return [min(range(len(teacher_reductions)),
                key=lambda t: abs(math.log2(teacher_reductions[t] / r)))
            for r in student_reductions]


class LossAttention(nn.Module):
    """LAM: scores (B,1,H,W), softmax over the H*W pixels of each image."""

    def __init__(self, channels: int, dim: int = 64) -> None:
        super().__init__()
        self.query = nn.Linear(channels, dim)
        self.key = nn.Conv2d(channels, dim, 1)
        self.scale = dim ** -0.5

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        b, _, h, w = feat.shape
        q = self.query(feat.mean(dim=(2, 3)))                      # (B,d)
        k = self.key(feat).flatten(2)                              # (B,d,HW)
        logits = torch.einsum("bd,bdn->bn", q, k) * self.scale
        return torch.softmax(logits, dim=1).view(b, 1, h, w)


class FeatureAcclimation(nn.Module):
    """Teacher stage features -> student-shaped features (FAM, projection, LAM).

    use_fam: False drops the transformer blocks (projection only).
    use_lam: False gives uniform scores 1/N.
    """

    def __init__(self, teacher_channels: list[int], teacher_reductions: list[int],
                 student_channels: list[int], student_reductions: list[int], use_fam: bool = True,
                 use_lam: bool = True, heads: int = 4, window: int = 7, lam_dim: int = 64) -> None:
        super().__init__()
        bad = [c for c in teacher_channels if c % heads]
        if use_fam and bad:
            raise ValueError(f"FAM heads ({heads}) must divide every teacher stage width, not {bad}")
        self.stage_of = nearest_stage(teacher_reductions, student_reductions)
        self.fams = nn.ModuleList([
            SwinTransformerBlock(c, (8 * window, 8 * window), num_heads=heads, window_size=window)
            if use_fam else nn.Identity() for c in teacher_channels])
        self.proj = nn.ModuleList([nn.Conv2d(teacher_channels[t], c, 1)
                                   for t, c in zip(self.stage_of, student_channels)])
        self.lams = nn.ModuleList([LossAttention(c, lam_dim) for c in student_channels]) \
            if use_lam else None

    def acclimate(self, teacher_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """FAM on each teacher stage (NCHW in and out)."""
        return [fam(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if isinstance(fam, SwinTransformerBlock)
                else f for fam, f in zip(self.fams, teacher_feats)]

    def forward(self, teacher_feats: list[torch.Tensor], sizes: list[tuple[int, int]]
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """(ghost decoder inputs, KD targets F^T_l, scores a^l (B,1,H,W)) per student level."""
        stages = self.acclimate(teacher_feats)
        ghost_in, targets, scores = [], [], []
        for level, (t, size) in enumerate(zip(self.stage_of, sizes)):
            f = self.proj[level](stages[t])
            if tuple(f.shape[-2:]) != tuple(size):
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            n = size[0] * size[1]
            a = (self.lams[level](f) if self.lams is not None
                 else f.new_full((f.shape[0], 1, *size), 1.0 / n))
            ghost_in.append(f * (n * a))
            targets.append(f)
            scores.append(a)
        return ghost_in, targets, scores


class GhostDecoder(nn.Module):
    """Copy of a DepthNet's decoder + head; frozen (no parameter grads) but differentiable
    with respect to its input features."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.decoder = copy.deepcopy(student.decoder)
        self.head = copy.deepcopy(student.head)
        self.requires_grad_(False)

    def sync(self, student: nn.Module) -> None:
        """Copy the student's current decoder and head weights (and BN buffers)."""
        self.decoder.load_state_dict(student.decoder.state_dict())
        self.head.load_state_dict(student.head.state_dict())

    def forward(self, feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Depth (B,1,H,W) at ``size``, as DepthNet.forward from encoder features."""
        depth = self.head(self.decoder(feats)[-1])["depth"]
        return F.interpolate(depth, size=size, mode="bilinear", align_corners=False)
