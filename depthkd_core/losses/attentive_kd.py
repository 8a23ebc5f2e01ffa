"""Attentive knowledge-distillation loss (DisDepth Sec. 3.4, METHODS.md section 3)::

    L_akd = sum_l sum_i a^l_i * ||F^T_{l,i} - F^S_{l,i}||^2

a^l_i: the LAM scores of level l (sum to 1 over the pixels i of each image);
||.||^2: squared L2 over channels. Summed over levels, averaged over the batch.
Without scores a_i = 1/N (plain feature MSE summed over channels).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from depthkd_core.losses.common import LOSSES


@LOSSES.register("attentive_kd")
class AttentiveKDLoss(nn.Module):
    """Called as ``loss(student_feats, teacher_feats, scores=None)``: lists of (B,C,H,W)
    features per level and (B,1,H,W) scores. Unlike the depth losses it takes features."""

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor],
                scores: Sequence[Tensor] | None = None) -> Tensor:
        if len(student) != len(teacher) or not student:
            raise ValueError(f"attentive_kd needs as many student as teacher levels (>0), got "
                             f"{len(student)} and {len(teacher)}")
        total = student[0].new_zeros(())
        for level, (s, t) in enumerate(zip(student, teacher)):
            if s.shape != t.shape:
                raise ValueError(f"attentive_kd level {level}: student {tuple(s.shape)} != "
                                 f"teacher {tuple(t.shape)}")
            sq = (t - s).pow(2).sum(dim=1, keepdim=True)            # (B,1,H,W)
            if scores is None:
                per_image = sq.mean(dim=(1, 2, 3))
            else:
                if scores[level].shape != sq.shape:
                    raise ValueError(f"attentive_kd level {level}: scores {tuple(scores[level].shape)} "
                                     f"!= {tuple(sq.shape)}")
                per_image = (scores[level] * sq).sum(dim=(1, 2, 3))
            total = total + per_image.mean()
        return total
