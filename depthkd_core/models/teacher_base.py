"""The teacher interface: ``teacher(images) -> depth`` and the helpers every teacher uses.

``images`` are (B,3,H,W) RGB in [0,1]; the result is (B,1,H,W) at the input
size. Loaders for each kind of teacher file are in ``teachers``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B,C,H,W); antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] * size[1] < x.shape[-2] * x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def round_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """Nearest (H, W) that are positive multiples of ``multiple``."""
    return (max(multiple, round(height / multiple) * multiple),
            max(multiple, round(width / multiple) * multiple))


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients; the graph to the input stays (DFAD needs it)."""
    module.eval()
    for param in module.parameters():  # ScriptModules lack requires_grad_()
        param.requires_grad_(False)
    return module


class Teacher:
    """Base: subclasses set the attributes and implement ``_predict`` at a size
    they choose; ``__call__`` validates the input and resizes the output back."""

    name: str = "teacher"
    is_metric: bool = True
    # Relative models that predict inverse depth (disparity), e.g. DPT/Depth Anything.
    is_inverse: bool = False
    differentiable: bool = True
    module: nn.Module | None = None
    input_size: tuple[int, int] | None = None

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _model_size(self, height: int, width: int) -> tuple[int, int]:
        return self.input_size or round_size(height, width, 32)

    def _check(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"teacher '{self.name}' expects float images (B,3,H,W), "
                             f"got {images.dtype} {tuple(images.shape)}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        depth = self._predict(resize(images, self._model_size(*size)))
        if depth.dim() == 3:
            depth = depth.unsqueeze(1)
        return resize(depth, size)

    def to(self, device: str | torch.device) -> "Teacher":
        if self.module is not None:
            self.module.to(device)
        return self

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, is_metric={self.is_metric}, "
                f"is_inverse={self.is_inverse}, differentiable={self.differentiable})")
