"""Transformation network G of Hu et al., *Data-free Dense Depth Distillation* (Sec. III-C).

An encoder-decoder with dilated convolutions and symmetric skip connections
(the paper adapts a dilated saliency network, adding the skips). It outputs an
image of the input's size. The last convolution starts with tiny weights and
the output is residual, ``G(x) = clamp(x + f(x), 0, 1)``, so G starts near the
identity and the BN-statistics loss moves images only as far as it pays.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation),
                         nn.GroupNorm(min(8, cout), cout), nn.LeakyReLU(0.2, inplace=True))


class TransformationNet(nn.Module):
    """G: (B,3,H,W) in [0,1] -> (B,3,H,W) in [0,1], any H, W.

    channels: encoder widths; each level after the first halves the resolution.
    dilations: the dilated convolutions of the bottleneck (context without
        further downsampling).
    init_scale: the last convolution's initial weights are scaled by this, so
        ``|G(x) - x|`` starts at about ``init_scale`` of a normal layer's output.
    GroupNorm, not BatchNorm: G's output must not depend on the rest of its batch.
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 128), dilations: Sequence[int] = (2, 4, 8),
                 init_scale: float = 1e-3) -> None:
        super().__init__()
        if not channels or min(channels) < 1 or not dilations or min(dilations) < 1:
            raise ValueError(f"TransformationNet needs positive channels and dilations, got "
                             f"{tuple(channels)} and {tuple(dilations)}")
        chans = [int(c) for c in channels]
        self.encoder = nn.ModuleList(
            [_conv(3, chans[0])] + [_conv(a, b, stride=2) for a, b in zip(chans, chans[1:])])
        self.bottleneck = nn.Sequential(*[_conv(chans[-1], chans[-1], dilation=d) for d in dilations])
        # decoder level i fuses the upsampled deeper feature with encoder skip i (symmetric)
        self.decoder = nn.ModuleList([_conv(b + a, a) for a, b in zip(chans[:-1], chans[1:])])
        self.head = nn.Conv2d(chans[0] * 2, 3, 3, padding=1)
        with torch.no_grad():
            self.head.weight.mul_(init_scale)
            self.head.bias.zero_()
        self.multiple = 2 ** (len(chans) - 1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % self.multiple, (-w) % self.multiple
        y = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x
        skips = []
        for block in self.encoder:
            y = block(y)
            skips.append(y)
        y = self.bottleneck(y)
        for block, skip in zip(reversed(self.decoder), reversed(skips[:-1])):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        delta = self.head(torch.cat([y, skips[0]], dim=1))[..., :h, :w]
        return (x + delta).clamp(0.0, 1.0)
