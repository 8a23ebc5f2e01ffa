"""DeepInversion-style per-batch input optimisation.

The reference point for the transformation network G (Hu et al., Sec. III-C):
instead of learning G, optimise the pixels of one batch directly with Adam on
the same L_G (Eq. 7/9; DeepInversion, Yin et al. 2020, needs thousands of
iterations per batch). ``depthkd_core.bench.transform`` times the two against each other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from depthkd_core.losses.bn_stats import BatchNormStatsLoss
from depthkd_core.methods.datafree import DatafreeConfig, transform_objective
from depthkd_core.models import Teacher


@dataclass
class InversionResult:
    """images: the optimised batch; bn: its L_bn; iterations run; seconds of wall time."""

    images: Tensor
    bn: float
    iterations: int
    seconds: float


def invert_batch(source: Tensor, teacher: Teacher, bn_loss: BatchNormStatsLoss, opts: DatafreeConfig,
                 iterations: int = 2000, lr: float = 0.01, target_bn: float | None = None
                 ) -> InversionResult:
    """Adam on the pixels of ``source`` (kept in [0,1]) minimising L_G; stops early once
    L_bn <= ``target_bn``. The BN loss reported is that of the returned images."""
    if iterations < 1 or lr <= 0:
        raise ValueError(f"invert_batch needs iterations >= 1 and lr > 0, got {iterations}, {lr}")
    images = source.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([images], lr=lr)
    start = time.perf_counter()
    for done in range(iterations + 1):
        loss, _, terms = transform_objective(images, source, teacher, bn_loss, opts)
        bn = float(terms["bn"])
        if done == iterations or (target_bn is not None and bn <= target_bn):
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            images.clamp_(0.0, 1.0)
    return InversionResult(images.detach(), bn, done, time.perf_counter() - start)
