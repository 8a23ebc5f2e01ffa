"""Object-wise image mixing from semantic maps (Hu et al., data-free distillation, Eq. 8).

For images x_a, x_b with semantic map s_a, a random half of the classes present
in s_a is chosen and ``M = 1`` where s_a is one of them::

    x_mix = M * x_a + (1 - M) * x_b

Depth is never mixed: the teacher labels the mixed image. In Algorithm 1, x_b
is the batch randomised, so each image is paired with another of its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class MixResult:
    """images: x_mix (B,3,H,W); mask: M (B,1,H,W) float; partner: index of x_b per row;
    chosen: (B,C) bool, the classes taken from x_a (C = max class id + 1)."""

    images: Tensor
    mask: Tensor
    partner: Tensor
    chosen: Tensor


def pair_partners(batch: int, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> Tensor:
    """A random cyclic pairing: partner[i] != i whenever batch > 1."""
    order = torch.randperm(batch, generator=generator).to(device)
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)
    return partner


class ObjectMixer:
    """Eq. 8 mixing for a whole batch at once (no loops over images or pixels).

    fraction: share of the present classes copied from x_a (paper: one half);
        at least one class is chosen whenever any is present.
    Labels < 0 mean "no label": such pixels never belong to the mask.
    """

    def __init__(self, fraction: float = 0.5) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"mixing fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def choose_classes(self, semantic: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B,C) bool: a random ``fraction`` of the classes present in each map."""
        batch = semantic.shape[0]
        flat = semantic.reshape(batch, -1)
        num_classes = int(flat.max()) + 1
        present = torch.zeros(batch, num_classes + 1, dtype=torch.bool, device=semantic.device)
        # unlabelled pixels (-1) go to a spare last column that is then dropped
        present.scatter_(1, torch.where(flat < 0, num_classes, flat), True)
        present = present[:, :num_classes]
        count = present.sum(1)
        k = torch.where(count > 0, (count * self.fraction).floor().clamp(min=1), count)
        keys = torch.rand(present.shape, generator=generator).to(semantic.device)
        keys = keys.masked_fill(~present, 2.0)  # absent classes sort last
        rank = keys.argsort(1).argsort(1)
        return present & (rank < k[:, None])

    def __call__(self, images: Tensor, semantic: Tensor,
                 generator: torch.Generator | None = None) -> MixResult:
        """Mix ``images`` (B,3,H,W) using ``semantic`` (B,H,W) int labels of the same batch."""
        if images.dim() != 4 or semantic.shape != (images.shape[0], *images.shape[-2:]):
            raise ValueError(f"mixing needs images (B,3,H,W) and semantic maps (B,H,W) of the "
                             f"same size, got {tuple(images.shape)} and {tuple(semantic.shape)}")
        if semantic.is_floating_point() or bool((semantic.reshape(len(semantic), -1) < 0).all(1).any()):
            raise ValueError("object-wise mixing needs integer semantic maps for every image "
                             "(a batch image has none); use a reader that provides them, "
                             "e.g. the 'sim' reader")
        chosen = self.choose_classes(semantic, generator)
        labels = semantic.clamp(min=0).reshape(len(semantic), -1)
        mask = chosen.gather(1, labels).reshape(semantic.shape) & (semantic >= 0)
        mask = mask[:, None].to(images.dtype)
        partner = pair_partners(images.shape[0], generator, images.device)
        mixed = mask * images + (1.0 - mask) * images[partner]
        return MixResult(mixed, mask, partner, chosen)
