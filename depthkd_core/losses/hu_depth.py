"""Depth + gradient + surface-normal loss of Hu et al. (METHODS.md section 1).

Hu, Ozay, Zhang, Okatani, *Revisiting Single Image Depth Estimation*, WACV 2019
(its depth, gradient and normal losses, weights 1), the ``L_depth`` of the
data-free distillation paper's Eq. 10::

    l_depth  = mean ln(|d - g| + a)
    l_grad   = mean ln(|dx(d) - dx(g)| + a) + ln(|dy(d) - dy(g)| + a)
    l_normal = mean (1 - <n_d, n_g> / (|n_d| |n_g|)),  n = (-dx, -dy, 1)
    L        = l_depth + grad_weight * l_grad + normal_weight * l_normal

Gradients dx, dy are 3x3 Sobel filters, as in Hu et al.'s code, computed with
``kornia.filters.spatial_gradient(normalized=True)``: the kernel is divided by 8
so a ramp of slope s gives exactly s (metres per pixel; Hu et al.'s code uses
the unnormalised kernel, i.e. 8x larger gradients inside the log). A gradient pixel
counts only if its whole 3x3 neighbourhood is valid and inside the image, so
holes in the ground truth and the padded border never contribute.

Note: when ``d == g`` the loss is not 0 but ``(1 + 2 * grad_weight) * ln(a)``
(negative for a < 1). If no pixel has a valid 3x3 neighbourhood, l_grad and
l_normal are 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.filters import spatial_gradient
from torch import Tensor, nn

from depthkd_core.losses.common import LOSSES
from depthkd_core.losses.common import check_inputs, masked_mean


def gradient_mask(mask: Tensor) -> Tensor:
    """Pixels whose 3x3 neighbourhood is valid and not on the image border."""
    invalid_near = F.max_pool2d((~mask).float(), kernel_size=3, stride=1, padding=1) > 0
    inside = torch.zeros_like(mask)
    inside[..., 1:-1, 1:-1] = True
    return mask & ~invalid_near & inside


@LOSSES.register("hu_depth")
class HuDepthLoss(nn.Module):
    """Hu et al. 2019 loss with ``a`` = 0.5 (METHODS.md section 1 default)."""

    def __init__(self, a: float = 0.5, grad_weight: float = 1.0, normal_weight: float = 1.0) -> None:
        super().__init__()
        if a <= 0:
            raise ValueError(f"HuDepthLoss a must be > 0 (it is inside a log), got {a}")
        self.a, self.grad_weight, self.normal_weight = a, grad_weight, normal_weight

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = check_inputs(pred, target, mask)
        l_depth = masked_mean(torch.log((pred - target).abs() + self.a), mask)
        grads = spatial_gradient(torch.cat([pred, target], dim=1), mode="sobel", normalized=True)
        dx_p, dx_t = grads[:, 0:1, 0], grads[:, 1:2, 0]
        dy_p, dy_t = grads[:, 0:1, 1], grads[:, 1:2, 1]
        gmask = gradient_mask(mask)
        l_grad = masked_mean(torch.log((dx_p - dx_t).abs() + self.a)
                             + torch.log((dy_p - dy_t).abs() + self.a), gmask)
        # n = (-dx, -dy, 1): the dot product and norms expand without building n.
        dot = dx_p * dx_t + dy_p * dy_t + 1.0
        norms = torch.sqrt(dx_p ** 2 + dy_p ** 2 + 1.0) * torch.sqrt(dx_t ** 2 + dy_t ** 2 + 1.0)
        l_normal = masked_mean(1.0 - dot / norms, gmask)
        return l_depth + self.grad_weight * l_grad + self.normal_weight * l_normal

