"""Decoders: encoder pyramid (deepest stride 32) -> feature map at stride 2.

Each of the stages halves the stride (32 -> 16 -> 8 -> 4 -> 2) and merges the
encoder feature of that stride when the encoder has one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(cin: int, cout: int, k: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def stage_reductions(reductions: list[int], num_stages: int) -> list[int]:
    """Output strides of the decoder stages; validates the encoder pyramid."""
    deepest = reductions[-1]
    steps = int(round(math.log2(deepest))) - 1
    if 2 ** (steps + 1) != deepest or steps < 1:
        raise ValueError(f"encoder's deepest stride must be a power of two >= 4, got {deepest}")
    if num_stages != steps:
        raise ValueError(f"decoder_channels needs {steps} entries for an encoder of stride "
                         f"{deepest}, got {num_stages}")
    return [deepest // 2 ** (i + 1) for i in range(steps)]


def skip_layout(reductions: list[int], stages: int) -> tuple[list[int], list[int]]:
    """Output stride of each decoder stage, and the encoder feature whose stride
    matches it (-1: none). Several features may share a stride: the deepest wins."""
    out_reductions = stage_reductions(reductions, stages)
    index = {r: i for i, r in enumerate(reductions)}
    return out_reductions, [index.get(r, -1) for r in out_reductions]


class StudentDecoder(nn.Module):
    """FastDepth NNConv5-style decoder (Wofk et al., ICRA 2019): per stage a
    depthwise 5x5 + pointwise conv, nearest x2 upsampling, then an additive
    skip (1x1-projected to the stage width)."""

    def __init__(self, channels: list[int], reductions: list[int],
                 decoder_channels: tuple[int, ...]) -> None:
        super().__init__()
        self.out_reductions, self.skip_ids = skip_layout(reductions, len(decoder_channels))
        cin = channels[-1]
        self.convs = nn.ModuleList()
        self.skips = nn.ModuleList()
        for cout, skip in zip(decoder_channels, self.skip_ids):
            self.convs.append(nn.Sequential(_conv_bn_relu(cin, cin, 5, groups=cin),
                                            _conv_bn_relu(cin, cout, 1)))
            self.skips.append(nn.Conv2d(channels[skip], cout, 1) if skip >= 0 else nn.Identity())
            cin = cout
        self.out_channels = decoder_channels[-1]

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        x = feats[-1]
        outs = []
        for conv, skip, idx in zip(self.convs, self.skips, self.skip_ids):
            x = F.interpolate(conv(x), scale_factor=2.0, mode="nearest")
            if idx >= 0:
                x = x + skip(feats[idx])
            outs.append(x)
        return outs


class UNetDecoder(nn.Module):
    """U-Net decoder for teachers: bilinear x2, concatenate the skip, two 3x3
    conv-BN-ReLU per stage."""

    def __init__(self, channels: list[int], reductions: list[int],
                 decoder_channels: tuple[int, ...]) -> None:
        super().__init__()
        self.out_reductions, self.skip_ids = skip_layout(reductions, len(decoder_channels))
        cin = channels[-1]
        self.blocks = nn.ModuleList()
        for cout, skip in zip(decoder_channels, self.skip_ids):
            merged = cin + (channels[skip] if skip >= 0 else 0)
            self.blocks.append(nn.Sequential(_conv_bn_relu(merged, cout, 3),
                                             _conv_bn_relu(cout, cout, 3)))
            cin = cout
        self.out_channels = decoder_channels[-1]

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        x = feats[-1]
        outs = []
        for block, idx in zip(self.blocks, self.skip_ids):
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            if idx >= 0:
                x = torch.cat([x, feats[idx]], dim=1)
            x = block(x)
            outs.append(x)
        return outs
