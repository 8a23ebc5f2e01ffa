"""BatchNorm-statistics loss of DeepInversion, as used by data-free depth distillation.

Hu et al., *Data-free Dense Depth Distillation*, Eq. 5-7 (METHODS.md section 1)::

    L_bn(x) = sum_l ||mu_l(x) - running_mean_l||_2 + ||var_l(x) - running_var_l||_2

over every BatchNorm layer l of the teacher, where mu_l, var_l are the batch
mean and (biased) variance per channel of that layer's *input*. The statistics
are read with forward hooks, so the teacher's ``forward`` is untouched; the
teacher stays in eval mode, so its running statistics never change.

Usage (one teacher forward gives both the depth and the statistics)::

    bn_loss = BatchNormStatsLoss(teacher.module)
    with bn_loss.recording():
        depth = teacher(images)
    loss = bn_loss()
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from depthkd_core.losses.common import LOSSES


def batchnorm_layers(module: nn.Module) -> list[_BatchNorm]:
    """BatchNorm layers of ``module`` that carry running statistics."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm)
            and m.running_mean is not None and m.running_var is not None]


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of (B,C,...) over every dim but C."""
    dims = [0, *range(2, x.dim())]
    return x.mean(dim=dims), x.var(dim=dims, unbiased=False)


@LOSSES.register("bn_stats")
class BatchNormStatsLoss(nn.Module):
    """Sum over BN layers of the L2 distances between batch and running statistics.

    ``module``: the teacher network (an ``nn.Module`` with BatchNorm layers).
    Raises ValueError when it has none: such a teacher cannot drive this loss.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ValueError(f"BatchNormStatsLoss needs a torch nn.Module, got {type(module).__name__}")
        layers = batchnorm_layers(module)
        if not layers:
            raise ValueError(f"{type(module).__name__} has no BatchNorm layers with running "
                             "statistics; the BN-statistics loss needs them")
        # a plain list, not a ModuleList: the teacher's layers are not this loss's parameters
        self.layers = layers
        self.stats: list[tuple[Tensor, Tensor, _BatchNorm]] = []
        self._recording = False
        self._handles = [layer.register_forward_hook(self._hook) for layer in layers]

    def _hook(self, layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if self._recording:
            mean, var = batch_stats(inputs[0])
            self.stats.append((mean, var, layer))

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the BN inputs' statistics of the teacher forwards run inside."""
        self.stats = []
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    def forward(self) -> Tensor:
        """L_bn of the forwards recorded by the last ``recording()`` block."""
        if not self.stats:
            raise ValueError("BatchNormStatsLoss: no statistics recorded; run the teacher "
                             "inside `with loss.recording():` first")
        terms = [torch.linalg.vector_norm(mean - layer.running_mean)
                 + torch.linalg.vector_norm(var - layer.running_var)
                 for mean, var, layer in self.stats]
        return torch.stack(terms).sum()

    def remove(self) -> None:
        """Detach the hooks from the teacher."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
