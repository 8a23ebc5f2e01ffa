"""Geometric distillation (Gao et al., Eq. b; METHODS.md s.2).

Teacher and student depth are back-projected to 3-D with each sample's
intrinsics (``Z = D, X = (u - cx) Z / fx, Y = (v - cy) Z / fy``, the formula of
``depthkd_core.geometry.backproject_depth``, here batched in torch), the same N
pixels are sampled from both, and a frozen PointNet embeds each point set:
``l_geod = MSE(points) + MSE(per-point features) + MSE(global feature)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn


def backproject(depth: Tensor, intrinsics: Tensor) -> Tensor:
    """(B,1,H,W) depth and (B,4) ``fx fy cx cy`` -> (B,H,W,3) camera-frame points."""
    if depth.dim() != 4 or depth.shape[1] != 1:
        raise ValueError(f"depth must be (B,1,H,W), got {tuple(depth.shape)}")
    if intrinsics.shape != (depth.shape[0], 4):
        raise ValueError(f"intrinsics must be (B={depth.shape[0]},4) fx fy cx cy, "
                         f"got {tuple(intrinsics.shape)}")
    if not bool((intrinsics[:, :2] > 0).all()):
        raise ValueError("intrinsics fx, fy must be > 0 (fill missing cameras first)")
    height, width = depth.shape[-2:]
    k = intrinsics.to(depth)[:, :, None, None]
    u = torch.arange(width, device=depth.device, dtype=depth.dtype).view(1, 1, 1, width)
    v = torch.arange(height, device=depth.device, dtype=depth.dtype).view(1, 1, height, 1)
    z = depth
    x = (u - k[:, 2:3]) * z / k[:, 0:1]
    y = (v - k[:, 3:4]) * z / k[:, 1:2]
    return torch.cat([x, y, z], dim=1).permute(0, 2, 3, 1)


def fill_intrinsics(intrinsics: Tensor, height: int, width: int, fx_fraction: float) -> tuple[Tensor, int]:
    """Rows that are all zero (DepthDataset's "unknown") replaced by a default camera:
    ``fx = fy = fx_fraction * width``, principal point at the image centre.
    Returns (filled (B,4), number of rows filled)."""
    if fx_fraction <= 0:
        raise ValueError(f"default fx fraction must be > 0, got {fx_fraction}")
    missing = (intrinsics == 0).all(dim=1, keepdim=True)
    fx = fx_fraction * width
    default = intrinsics.new_tensor([fx, fx, (width - 1) / 2.0, (height - 1) / 2.0]).expand_as(intrinsics)
    return torch.where(missing, default, intrinsics), int(missing.sum())


class PointNetEncoder(nn.Module):
    """Frozen PointNet embedding: shared MLP 3-64-128-1024 (ReLU between layers) + max pool.

    Weights: random from ``seed`` (drawn in a forked RNG, so the caller's random
    stream is untouched), or a state dict at ``weights``. Never trained: the
    parameters have ``requires_grad=False``; gradients flow through it to the points.
    """

    def __init__(self, seed: int = 0, weights: str | Path | None = None) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.mlp = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 128), nn.ReLU(),
                                     nn.Linear(128, 1024))
        if weights is not None:
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(f"PointNet weights not found: {path}")
            self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PointNetEncoder:
        return super().train(False)  # frozen: stays in eval mode

    def forward(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """(B,N,3) -> per-point features (B,N,1024), global feature (B,1024)."""
        features = self.mlp(points)
        return features, features.amax(dim=1)


class GeometricDistillation(nn.Module):
    """``l_geod`` between student and teacher depth (both > 0, metres or depth-like).

    Called as ``loss(pred, target, intrinsics, generator=None) -> {"input", "feature",
    "global", "total"}``; ``n_points`` pixel indices (the same for T and S and for
    every image of the batch) come from ``generator`` (default: torch's global RNG,
    which the Trainer seeds and checkpoints).
    """

    def __init__(self, n_points: int = 1024, seed: int = 0, weights: str | Path | None = None) -> None:
        super().__init__()
        if n_points < 1:
            raise ValueError(f"n_points must be >= 1, got {n_points}")
        self.n_points = n_points
        self.pointnet = PointNetEncoder(seed, weights)

    def sample(self, points: Tensor, index: Tensor) -> Tensor:
        return points.flatten(1, 2)[:, index]

    def forward(self, pred: Tensor, target: Tensor, intrinsics: Tensor,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        if target.shape != pred.shape:
            raise ValueError(f"target shape {tuple(target.shape)} != pred shape {tuple(pred.shape)}")
        pixels = pred.shape[-2] * pred.shape[-1]
        index = torch.randperm(pixels, generator=generator)[:self.n_points].to(pred.device)
        p_s = self.sample(backproject(pred, intrinsics), index)
        with torch.no_grad():
            p_t = self.sample(backproject(target.detach(), intrinsics), index)
            f_t, g_t = self.pointnet(p_t)
        f_s, g_s = self.pointnet(p_s)
        terms = {"input": nn.functional.mse_loss(p_s, p_t),
                 "feature": nn.functional.mse_loss(f_s, f_t),
                 "global": nn.functional.mse_loss(g_s, g_t)}
        terms["total"] = terms["input"] + terms["feature"] + terms["global"]
        return terms
