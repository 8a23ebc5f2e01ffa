"""Depth image -> organized 3-D points in the camera optical frame.

Pinhole model (as in depth_image_proc's ``convertDepth``):
``X = (u - cx) Z / fx``, ``Y = (v - cy) Z / fy``, ``Z = D`` (x right, y down, z forward).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from depthkd_core.geometry.intrinsics import Intrinsics


@lru_cache(maxsize=16)
def _rays(K: Intrinsics) -> tuple[np.ndarray, np.ndarray]:
    """Per-column ``(u - cx) / fx`` (1, W) and per-row ``(v - cy) / fy`` (H, 1).

    Cached per camera because the live node back-projects every frame with the
    same intrinsics; the arrays are read-only so callers cannot corrupt the cache.
    """
    x = ((np.arange(K.width, dtype=np.float64) - K.cx) / K.fx).astype(np.float32)[None, :]
    y = ((np.arange(K.height, dtype=np.float64) - K.cy) / K.fy).astype(np.float32)[:, None]
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def backproject_depth(depth: np.ndarray, K: Intrinsics, min_depth: float = 0.0,
                      max_depth: float = np.inf) -> np.ndarray:
    """Back-project an HxW depth map (metres) to (H, W, 3) float32 points.

    Pixels whose depth is non-finite, <= 0, or outside ``[min_depth, max_depth]``
    become NaN in all three coordinates (an organized cloud with ``is_dense=false``).
    """
    depth = np.asarray(depth)
    if depth.shape != (K.height, K.width):
        raise ValueError(f"depth shape {depth.shape} does not match the intrinsics' "
                         f"(height, width) = {(K.height, K.width)}")
    if min_depth > max_depth:
        raise ValueError(f"min_depth {min_depth} is greater than max_depth {max_depth}")
    z = depth.astype(np.float32, copy=False)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(z) & (z > 0) & (z >= min_depth) & (z <= max_depth)
    x_ray, y_ray = _rays(K)
    points = np.empty((K.height, K.width, 3), dtype=np.float32)
    np.copyto(points[..., 2], np.where(valid, z, np.float32(np.nan)))
    # NaN in Z propagates to X and Y through the multiply.
    np.multiply(points[..., 2], x_ray, out=points[..., 0])
    np.multiply(points[..., 2], y_ray, out=points[..., 1])
    return points
