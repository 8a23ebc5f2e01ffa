"""Align a relative depth prediction to a metric reference (dense or sparse).

Least squares scale and shift (Gao et al., two-stage depth completion; MiDaS
evaluation): ``argmin_{s,t} sum_valid (s * pred + t - ref)^2``. Median scaling
(Zhou et al. 2017; monodepth2 evaluation): ``s = median(ref) / median(pred)``.
A pixel takes part when the mask allows it, ``ref`` is finite and > 0 and
``pred`` is finite, so a projected LiDAR scan with zeros elsewhere works as is.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

AlignMode = Literal["none", "median", "lsq"]
ALIGN_MODES: tuple[str, ...] = ("none", "median", "lsq")


def _valid_pairs(pred: np.ndarray, ref: np.ndarray,
                 mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"pred shape {pred.shape} does not match ref shape {ref.shape}")
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(pred) & np.isfinite(ref) & (ref > 0)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != pred.shape:
            raise ValueError(f"mask shape {mask.shape} does not match pred shape {pred.shape}")
        valid &= mask
    return pred[valid].astype(np.float64), ref[valid].astype(np.float64)


def fit_scale_shift(pred: np.ndarray, ref: np.ndarray,
                    mask: np.ndarray | None = None) -> tuple[float, float]:
    """Least-squares ``(s, t)`` minimising ``sum (s * pred + t - ref)^2`` over valid pixels.

    The 2x2 normal equations solved in centred form (same solution, no loss of
    precision when depths are large): ``s = cov(p, r) / var(p)``, ``t = mean(r) - s mean(p)``.
    """
    p, r = _valid_pairs(pred, ref, mask)
    if p.size < 2:
        raise ValueError(f"least-squares alignment needs at least 2 valid pixels, got {p.size}")
    p_mean, r_mean = p.mean(), r.mean()
    dp = p - p_mean
    var_p = float(np.dot(dp, dp))
    if var_p <= 1e-12 * max(float(np.dot(p, p)), np.finfo(np.float64).tiny):
        raise ValueError(f"least-squares alignment is degenerate: the prediction is constant "
                         f"({p_mean:g}) over the {p.size} valid pixels")
    s = float(np.dot(dp, r - r_mean)) / var_p
    return s, float(r_mean - s * p_mean)


def fit_median_scale(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """``median(ref) / median(pred)`` over valid pixels."""
    p, r = _valid_pairs(pred, ref, mask)
    if p.size < 1:
        raise ValueError("median alignment needs at least 1 valid pixel, got 0")
    p_median = float(np.median(p))
    if p_median <= 0.0:
        raise ValueError(f"median alignment is degenerate: median prediction is {p_median:g} "
                         "(must be > 0)")
    return float(np.median(r)) / p_median


def align_depth(pred: np.ndarray, ref: np.ndarray, mode: AlignMode,
                mask: np.ndarray | None = None) -> np.ndarray:
    """Return ``pred`` (float32) aligned to ``ref`` by ``mode``: none | median | lsq."""
    pred = np.asarray(pred)
    if mode == "none":
        if pred.shape != np.shape(ref):
            raise ValueError(f"pred shape {pred.shape} does not match ref shape {np.shape(ref)}")
        return pred.astype(np.float32)
    if mode == "median":
        return (pred * fit_median_scale(pred, ref, mask)).astype(np.float32)
    if mode == "lsq":
        s, t = fit_scale_shift(pred, ref, mask)
        return (pred * s + t).astype(np.float32)
    raise ValueError(f"unknown alignment mode {mode!r}; expected one of {', '.join(ALIGN_MODES)}")
