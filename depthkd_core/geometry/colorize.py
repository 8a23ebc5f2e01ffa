"""Depth -> RGB preview with the Turbo colormap (near = red, far = blue, invalid = black)."""

from __future__ import annotations

import numpy as np

# Turbo's published polynomial approximation (A. Mikhailov, R. Du, Google 2019;
# Apache-2.0): channel(x) = c . (1, x, x^2, x^3, x^4, x^5).
_TURBO_COEFFS = np.array([
    [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
    [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
    [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
])


def _turbo_lut() -> np.ndarray:
    x = np.linspace(0.0, 1.0, 256)
    powers = x[:, None] ** np.arange(6)[None, :]
    rgb = np.clip(powers @ _TURBO_COEFFS.T, 0.0, 1.0)
    lut = np.round(rgb * 255.0).astype(np.uint8)
    lut.flags.writeable = False
    return lut


TURBO_LUT: np.ndarray = _turbo_lut()
"""256x3 uint8 RGB; index 0 is Turbo's dark blue end, 255 its dark red end."""


def colorize_depth(depth: np.ndarray, min_depth: float | None = None,
                   max_depth: float | None = None) -> np.ndarray:
    """HxW depth (metres) -> HxWx3 uint8 RGB; NaN/inf/<=0 are black.

    Unset range ends default to the 2nd/98th percentiles of the valid depths so
    a few outliers do not wash out the image.
    """
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth must be a 2-D HxW array, got shape {depth.shape}")
    if min_depth is not None and max_depth is not None and max_depth < min_depth:
        raise ValueError(f"colorize range is empty: min_depth {min_depth} > max_depth {max_depth}")
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(depth) & (depth > 0)
    out = np.zeros(depth.shape + (3,), dtype=np.uint8)
    if not valid.any():
        return out
    if min_depth is None or max_depth is None:
        lo, hi = np.percentile(depth[valid], (2.0, 98.0))
        min_depth = float(lo) if min_depth is None else min_depth
        max_depth = max(float(hi) if max_depth is None else max_depth, min_depth)
    # Near is warm: the nearest depth maps to the red end (index 255) of the LUT;
    # a flat scene (zero range) is drawn entirely in the near colour.
    span = max(float(max_depth) - float(min_depth), np.finfo(np.float32).tiny)
    t = (np.float32(max_depth) - depth[valid]) / np.float32(span)
    t = np.where(max_depth > min_depth, t, np.float32(1.0))
    out[valid] = TURBO_LUT[np.clip(np.rint(t * 255.0), 0, 255).astype(np.intp)]
    return out
