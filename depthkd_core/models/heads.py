"""Depth heads (registry ``HEADS``): decoder feature -> bounded metric depth.

Each head maps (B,C,h,w) to a dict with "depth" (B,1,h,w) and, for the
probabilistic heads, "probs" (B,K,h,w) and "bin_centers" (B,K).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..registry import Registry
from .config import ModelConfig

HEADS: Registry = Registry("head")


def dpm_centers(min_depth: float, max_depth: float, num_bins: int,
                layout: str = "log") -> torch.Tensor:
    """Fixed TIE-KD bin centres c_k over [min_depth, max_depth] (METHODS.md s.4)."""
    if layout == "log":
        return torch.logspace(math.log10(min_depth), math.log10(max_depth), num_bins)
    if layout == "linear":
        return torch.linspace(min_depth, max_depth, num_bins)
    raise ValueError(f"bin layout must be 'log' or 'linear', got '{layout}'")


def expected_depth(probs: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """d = sum_k p_k c_k for probs (B,K,h,w) and centres (B,K)."""
    return (probs * centers[:, :, None, None]).sum(dim=1, keepdim=True)


@HEADS.register("direct")
class DirectHead(nn.Module):
    """Sigmoid mapped log-linearly onto the range: d = d_min (d_max/d_min)^sigmoid(z).

    Log-space keeps the relative resolution equal at near and far depths, and
    z = 0 gives the geometric mean of the range (1 m for 0.1-10 m).
    """

    def __init__(self, in_channels: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.log_min = math.log(cfg.min_depth)
        self.log_span = math.log(cfg.max_depth / cfg.min_depth)

    def forward(self, feat: torch.Tensor) -> dict[str, torch.Tensor]:
        z = torch.sigmoid(self.conv(feat))
        return {"depth": torch.exp(self.log_min + self.log_span * z)}


@HEADS.register("bins")
class BinsHead(nn.Module):
    """AdaBins adaptive bins (Bhat et al., CVPR 2021; DisDepth head, METHODS.md s.3).

    Widths w = (d_max - d_min) softmax(MLP(avgpool(f))); centres
    c_k = d_min + sum_{j<k} w_j + w_k / 2; p = softmax_k(conv1x1(f));
    d = sum_k p_k c_k.
    """

    def __init__(self, in_channels: int, cfg: ModelConfig, hidden: int = 128) -> None:
        super().__init__()
        self.min_depth, self.span = cfg.min_depth, cfg.max_depth - cfg.min_depth
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, cfg.num_bins))
        self.logits = nn.Conv2d(in_channels, cfg.num_bins, 1)

    def forward(self, feat: torch.Tensor) -> dict[str, torch.Tensor]:
        # Sum / count, not mean(): onnx cannot convert the dynamo exporter's opset-18
        # ReduceMean down to opset 17, while ReduceSum is unchanged since opset 13.
        pooled = feat.sum(dim=(2, 3)) / (feat.shape[-2] * feat.shape[-1])
        widths = torch.softmax(self.mlp(pooled), dim=1) * self.span
        centers = self.min_depth + torch.cumsum(widths, dim=1) - 0.5 * widths
        probs = torch.softmax(self.logits(feat), dim=1)
        return {"depth": expected_depth(probs, centers), "probs": probs,
                "bin_centers": centers, "bin_widths": widths}


@HEADS.register("dpm")
class DPMHead(nn.Module):
    """TIE-KD depth probability map head (Choi et al., METHODS.md s.4): fixed
    centres c_k, P = softmax_k(conv1x1(f)), d = sum_k P_k c_k."""

    def __init__(self, in_channels: int, cfg: ModelConfig) -> None:
        super().__init__()
        centers = dpm_centers(cfg.min_depth, cfg.max_depth, cfg.num_bins, cfg.bin_layout)
        # Derived from the config, so kept out of the state dict.
        self.register_buffer("centers", centers, persistent=False)
        self.logits = nn.Conv2d(in_channels, cfg.num_bins, 1)

    def forward(self, feat: torch.Tensor) -> dict[str, torch.Tensor]:
        probs = torch.softmax(self.logits(feat), dim=1)
        centers = self.centers.unsqueeze(0).expand(feat.shape[0], -1)
        return {"depth": expected_depth(probs, centers), "probs": probs, "bin_centers": centers}


def build_head(cfg: ModelConfig, in_channels: int) -> nn.Module:
    return HEADS.get(cfg.head)(in_channels, cfg)
