"""Standard monocular depth metrics (Eigen et al. 2014), numpy only.

Follows the evaluation code of BTS / AdaBins / monodepth2 (``compute_errors``):
valid pixels have finite ground truth in ``(min_depth, max_depth]`` (inside the
optional Eigen/Garg crop); the prediction is aligned on those pixels if asked,
then clipped to ``[min_depth, max_depth]``. Per-image metrics are averaged over
a dataset. torch tensors are accepted (converted on the CPU) without importing torch.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from depthkd_core.geometry.alignment import ALIGN_MODES, AlignMode, align_depth

Crop = Literal["eigen", "garg"] | None
METRIC_KEYS: tuple[str, ...] = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog",
                                "delta1", "delta2", "delta3")
CROPS: tuple[str, ...] = ("eigen", "garg")


def eigen_crop_mask(height: int, width: int) -> np.ndarray:
    """NYU-v2 Eigen crop: rows 45:471, cols 41:601 at 480x640, scaled to ``height`` x ``width``."""
    mask = np.zeros((height, width), dtype=bool)
    mask[45 * height // 480:471 * height // 480, 41 * width // 640:601 * width // 640] = True
    return mask


def garg_crop_mask(height: int, width: int) -> np.ndarray:
    """KITTI Garg crop (Garg et al. 2016), fractions as in monodepth2's evaluation."""
    mask = np.zeros((height, width), dtype=bool)
    mask[int(0.40810811 * height):int(0.99189189 * height),
         int(0.03594771 * width):int(0.96405229 * width)] = True
    return mask


def _crop_mask(crop: Crop, height: int, width: int) -> np.ndarray | None:
    if crop is None or crop == "none":
        return None
    if crop == "eigen":
        return eigen_crop_mask(height, width)
    if crop == "garg":
        return garg_crop_mask(height, width)
    raise ValueError(f"unknown crop {crop!r}; expected None, 'eigen' or 'garg'")


def _as_images(x: Any, name: str) -> np.ndarray:
    """(H,W), (1,H,W) or (B,1,H,W) array or tensor -> (N,H,W) float64."""
    if hasattr(x, "detach"):  # a torch tensor; checked by duck type so torch is never imported
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        return x[None]
    if x.ndim == 3 and x.shape[0] == 1:
        return x
    if x.ndim == 4 and x.shape[1] == 1:
        return x[:, 0]
    raise ValueError(f"{name} must have shape (H,W), (1,H,W) or (B,1,H,W), got {x.shape}")


def _errors(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Metrics over 1-D arrays of valid, positive depths.

    ``silog = 100 * sqrt(mean(g^2) - mean(g)^2)``, ``g = ln pred - ln gt``: the
    scale-invariant log error with lambda = 1 as reported by BTS/AdaBins.
    """
    ratio = np.maximum(gt / pred, pred / gt)
    diff = gt - pred
    g = np.log(pred) - np.log(gt)
    return {
        "abs_rel": float(np.mean(np.abs(diff) / gt)),
        "sq_rel": float(np.mean(diff ** 2 / gt)),
        "rmse": float(np.sqrt(np.mean(diff ** 2))),
        "rmse_log": float(np.sqrt(np.mean(g ** 2))),
        "log10": float(np.mean(np.abs(np.log10(pred) - np.log10(gt)))),
        "silog": float(100.0 * np.sqrt(max(np.mean(g ** 2) - np.mean(g) ** 2, 0.0))),
        "delta1": float(np.mean(ratio < 1.25)),
        "delta2": float(np.mean(ratio < 1.25 ** 2)),
        "delta3": float(np.mean(ratio < 1.25 ** 3)),
    }


def _aligned_depth(pred: np.ndarray, gt: np.ndarray, min_depth: float, max_depth: float,
                   alignment: AlignMode, inverse: bool) -> np.ndarray:
    """Align ``pred`` to the valid ``gt`` values, convert to depth and clip to the range.

    Inverse-depth (disparity) predictions are aligned to ``1 / gt`` and capped
    below at ``1 / max_depth`` before inversion, as in the MiDaS evaluation.
    """
    if not inverse:
        p = align_depth(pred, gt, alignment).astype(np.float64)
    else:
        disp = align_depth(pred, 1.0 / gt, alignment).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = 1.0 / np.maximum(disp, 1.0 / max_depth)
    # As in BTS/AdaBins: non-finite predictions count as the range limits, then clip.
    return np.clip(np.nan_to_num(p, nan=min_depth, posinf=max_depth, neginf=min_depth),
                   min_depth, max_depth)


def _image_metrics(pred: np.ndarray, gt: np.ndarray, min_depth: float, max_depth: float,
                   crop_mask: np.ndarray | None, alignment: AlignMode,
                   inverse: bool) -> dict[str, float]:
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(gt) & (gt > min_depth) & (gt <= max_depth)
    if crop_mask is not None:
        valid &= crop_mask
    if not valid.any():
        raise ValueError(f"no valid ground-truth pixels in ({min_depth}, {max_depth}]"
                         + (" inside the crop" if crop_mask is not None else ""))
    p = _aligned_depth(pred[valid], gt[valid], min_depth, max_depth, alignment, inverse)
    return _errors(p, gt[valid])


def _per_image(pred: Any, gt: Any, min_depth: float, max_depth: float, crop: Crop,
               alignment: AlignMode, inverse: bool) -> list[dict[str, float]]:
    if not 0.0 < min_depth < max_depth:
        raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth} and {max_depth}")
    if alignment not in ALIGN_MODES:
        raise ValueError(f"unknown alignment {alignment!r}; expected one of {', '.join(ALIGN_MODES)}")
    if inverse and alignment == "none":
        raise ValueError("inverse-depth predictions need alignment 'median' or 'lsq', got 'none'")
    pred_n, gt_n = _as_images(pred, "pred"), _as_images(gt, "gt")
    if pred_n.shape != gt_n.shape:
        raise ValueError(f"pred shape {np.shape(pred)} does not match gt shape {np.shape(gt)}")
    crop_mask = _crop_mask(crop, *gt_n.shape[1:])
    return [_image_metrics(p, g, min_depth, max_depth, crop_mask, alignment, inverse)
            for p, g in zip(pred_n, gt_n)]


def compute_depth_metrics(pred: Any, gt: Any, min_depth: float = 1e-3, max_depth: float = 10.0,
                          crop: Crop = None, alignment: AlignMode = "none",
                          inverse: bool = False) -> dict[str, float]:
    """Metrics of ``pred`` against ``gt`` (metres); a batch gives the mean of per-image metrics.

    ``alignment``: none | median | lsq (``geometry.align_depth``, fitted per image on
    the valid pixels). ``inverse``: ``pred`` is relative inverse depth (a teacher's
    ``is_inverse``), aligned in disparity space. Raises ValueError on a shape
    mismatch or an image without valid ground truth.
    """
    rows = _per_image(pred, gt, min_depth, max_depth, crop, alignment, inverse)
    return {key: float(np.mean([row[key] for row in rows])) for key in METRIC_KEYS}


class MetricAccumulator:
    """Averages per-image metrics over a dataset; ``compute()`` adds ``count`` (images)."""

    def __init__(self) -> None:
        self._sums = dict.fromkeys(METRIC_KEYS, 0.0)
        self.count = 0

    def update(self, pred: Any, gt: Any, min_depth: float = 1e-3, max_depth: float = 10.0,
               crop: Crop = None, alignment: AlignMode = "none", inverse: bool = False) -> None:
        """Add every image of ``pred``/``gt`` (same arguments as ``compute_depth_metrics``)."""
        for row in _per_image(pred, gt, min_depth, max_depth, crop, alignment, inverse):
            for key in METRIC_KEYS:
                self._sums[key] += row[key]
            self.count += 1

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("no images were accumulated; call update() first")
        result = {key: total / self.count for key, total in self._sums.items()}
        result["count"] = self.count
        return result
