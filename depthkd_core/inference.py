"""The per-frame depth pipeline the live node runs, usable without ROS.

RGB frame + intrinsics (+ optional sparse metric depth) -> metric depth with NaN
for invalid pixels, the intrinsics of that depth image, and stage timings. Only
numpy, OpenCV and onnxruntime (through ``depthkd_core.runtime``): no
torch, no rclpy, so a robot starts it fast.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import cv2
import numpy as np

from depthkd_core.geometry import Intrinsics, backproject_depth, fit_median_scale, fit_scale_shift
from depthkd_core.imaging import resize_rgb

OUTPUT_RESOLUTIONS = ("camera", "model")
CLOUD_RESOLUTIONS = ("model", "camera")
ALIGNMENTS = ("none", "lsq", "median", "scale")
SPARSE_ALIGNMENTS = ("lsq", "median")
# Students accept any size that is a multiple of their encoder stride.
_STRIDE = 32


class DepthModel(Protocol):
    """What the estimator needs from ``depthkd_core.runtime.OnnxDepthModel``."""

    @property
    def input_size(self) -> tuple[int, int] | None: ...

    def predict_batch(self, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class EstimatorConfig:
    """How a frame becomes published depth.

    ``input_size`` (H, W) overrides the network input for models with dynamic
    axes; for a fixed-size model it must equal the model's size.
    ``alignment``: none (metric model), scale (multiply by ``depth_scale``),
    lsq / median (fit to sparse metric depth; Gao et al.'s two-stage idea).
    """

    output_resolution: str = "camera"
    alignment: str = "none"
    depth_scale: float = 1.0
    min_depth: float = 0.1
    max_depth: float = 10.0
    input_size: tuple[int, int] | None = None
    min_sparse_points: int = 20

    def __post_init__(self) -> None:
        if self.output_resolution not in OUTPUT_RESOLUTIONS:
            raise ValueError(f"output_resolution must be one of {OUTPUT_RESOLUTIONS}, "
                             f"got {self.output_resolution!r}")
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {self.alignment!r}")
        if not (math.isfinite(self.depth_scale) and self.depth_scale > 0):
            raise ValueError(f"depth_scale must be finite and > 0, got {self.depth_scale}")
        if not (0.0 <= self.min_depth < self.max_depth and math.isfinite(self.max_depth)):
            raise ValueError(f"need 0 <= min_depth < max_depth < inf, got min_depth="
                             f"{self.min_depth}, max_depth={self.max_depth}")
        if self.input_size is not None and (len(self.input_size) != 2
                                            or min(self.input_size) <= 0):
            raise ValueError(f"input_size must be (height, width) > 0, got {self.input_size}")
        if self.min_sparse_points < 2:
            raise ValueError(f"min_sparse_points must be >= 2, got {self.min_sparse_points}")


@dataclass
class DepthResult:
    """``depth`` HxW float32 metres (NaN invalid) and the ``intrinsics`` of that grid.

    ``model_depth`` / ``model_intrinsics``: the same depth (alignment and range applied)
    on the network's output grid, before any resize to the camera; the same objects
    as ``depth`` / ``intrinsics`` when the output is at model resolution.
    ``network_rgb``: the frame as the network saw it (uint8 RGB at its input size).
    """

    depth: np.ndarray
    intrinsics: Intrinsics
    model_depth: np.ndarray
    model_intrinsics: Intrinsics
    timings: dict[str, float] = field(default_factory=dict)  # ms: preprocess/inference/postprocess
    scale: float = 1.0
    shift: float = 0.0
    network_rgb: np.ndarray | None = None

    def cloud_grid(self, resolution: str) -> tuple[np.ndarray, Intrinsics]:
        """Depth and intrinsics a point cloud is built from (a ``CLOUD_RESOLUTIONS`` entry):
        ``model`` the network's grid, ``camera`` the published depth's grid (the camera's
        unless the output is at model resolution), whose extra points are interpolated."""
        if resolution not in CLOUD_RESOLUTIONS:
            raise ValueError(f"cloud resolution must be one of {CLOUD_RESOLUTIONS}, "
                             f"got {resolution!r}")
        if resolution == "model":
            return self.model_depth, self.model_intrinsics
        return self.depth, self.intrinsics

    def cloud_colors(self, resolution: str, rgb: np.ndarray) -> np.ndarray:
        """The frame ``rgb`` on the ``cloud_grid(resolution)``: the network's own input when
        that is the grid (already resized: the cost of a second resize was a third of the
        live node's overhead at 192x192), else ``imaging.resize_rgb`` of it."""
        depth, _ = self.cloud_grid(resolution)
        if self.network_rgb is not None and self.network_rgb.shape[:2] == depth.shape:
            return self.network_rgb
        return resize_rgb(rgb, *depth.shape)


def resolve_input_size(model_size: tuple[int, int] | None,
                       requested: tuple[int, int] | None) -> tuple[int, int] | None:
    """The network input (H, W): the model's fixed size, the requested one, or None (per frame)."""
    if model_size is None:
        return requested
    model_size = (int(model_size[0]), int(model_size[1]))
    if requested is not None and tuple(requested) != model_size:
        raise ValueError(f"the model takes a fixed {model_size[0]}x{model_size[1]} (HxW) input, "
                         f"but {requested[0]}x{requested[1]} was requested")
    return model_size


def decimated_intrinsics(K: Intrinsics, n: int) -> Intrinsics:
    """Intrinsics of the grid ``image[::n, ::n]``: pixel i there is pixel n*i here, exactly."""
    if n < 1:
        raise ValueError(f"decimation must be >= 1, got {n}")
    return Intrinsics(fx=K.fx / n, fy=K.fy / n, cx=K.cx / n, cy=K.cy / n,
                      width=-(-K.width // n), height=-(-K.height // n))


def build_point_cloud(depth: np.ndarray, K: Intrinsics, decimation: int = 1,
                      rgb: np.ndarray | None = None, min_depth: float = 0.0,
                      max_depth: float = np.inf) -> tuple[np.ndarray, np.ndarray | None]:
    """Organized (h, w, 3) float32 points of every ``decimation``-th row/column (NaN invalid).

    ``rgb`` (any size; resized to the depth grid if needed, ``imaging.resize_rgb``) gives
    matching (h, w, 3) uint8 colours, else None.
    """
    depth = np.asarray(depth)
    sub = depth[::decimation, ::decimation] if decimation > 1 else depth
    points = backproject_depth(sub, decimated_intrinsics(K, decimation), min_depth, max_depth)
    if rgb is None:
        return points, None
    rgb = resize_rgb(rgb, *depth.shape)
    return points, np.ascontiguousarray(rgb[::decimation, ::decimation])


def _ms(start: float, end: float) -> float:
    return (end - start) * 1e3


class DepthEstimator:
    """Runs one depth model on camera frames; swap models by building a new estimator."""

    def __init__(self, model: DepthModel, config: EstimatorConfig | None = None) -> None:
        self.model = model
        self.config = config or EstimatorConfig()
        self.input_size = resolve_input_size(model.input_size, self.config.input_size)

    def network_size(self, height: int, width: int) -> tuple[int, int]:
        """Network input (H, W) for a ``height`` x ``width`` frame.

        A dynamic-size model without a requested size gets the frame size
        rounded to the nearest multiple of 32 (the encoder stride), at least 32,
        as ``OnnxDepthModel.predict`` does.
        """
        if self.input_size is not None:
            return self.input_size
        return (max(_STRIDE, round(height / _STRIDE) * _STRIDE),
                max(_STRIDE, round(width / _STRIDE) * _STRIDE))

    def dry_run(self, frames: Sequence[np.ndarray]) -> None:
        """Run the model on ``frames`` (HxWx3 uint8 RGB) as ``estimate`` would; ValueError if
        an output is not (1, 1, H, W) or has any NaN/inf, so ``estimate`` would skip it.

        Judge a model on real content (the camera's last frames, or a real-looking
        image): a model can be finite on a black frame and NaN on every real one.
        """
        if not frames:
            raise ValueError("a dry run needs at least one frame")
        for index, rgb in enumerate(frames):
            out = np.asarray(self.model.predict_batch(self._network_input(rgb)[0]))
            if out.ndim != 4 or out.shape[:2] != (1, 1):
                raise ValueError(f"model output must be (1, 1, H, W) depth, got shape {out.shape}")
            bad = int(out.size - np.count_nonzero(np.isfinite(out)))
            if bad:
                raise ValueError(f"model output is not finite on real content: {bad} of "
                                 f"{out.size} values are NaN/inf on frame {index + 1} of "
                                 f"{len(frames)} ({rgb.shape[1]}x{rgb.shape[0]})")

    def _network_input(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """HxWx3 uint8 RGB -> the (1, 3, h, w) float32 network input in [0, 1], and the
        hxwx3 uint8 image it was made from."""
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected HxWx3 uint8 RGB, got {rgb.dtype} {rgb.shape}")
        height, width = rgb.shape[:2]
        net_h, net_w = self.network_size(height, width)
        # The whole frame is resized (no crop), so the field of view is kept and
        # Intrinsics.scaled stays exact even when the aspect ratio changes.
        rgb = resize_rgb(rgb, net_h, net_w)
        x = np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], dtype=np.float32)
        x *= np.float32(1.0 / 255.0)
        return x, rgb

    def estimate(self, rgb: np.ndarray, intrinsics: Intrinsics,
                 sparse_depth: np.ndarray | None = None) -> DepthResult:
        """HxWx3 uint8 RGB with its intrinsics -> metric depth; ValueError on bad input/output."""
        t0 = time.perf_counter()
        x, network_rgb = self._network_input(rgb)
        height, width = np.shape(rgb)[:2]
        if (intrinsics.height, intrinsics.width) != (height, width):
            raise ValueError(f"intrinsics are for {intrinsics.width}x{intrinsics.height} but the "
                             f"image is {width}x{height}")
        t1 = time.perf_counter()
        pred = np.asarray(self.model.predict_batch(x))
        t2 = time.perf_counter()
        depth, K, model_depth, model_K, scale, shift = self._postprocess(pred, intrinsics,
                                                                         sparse_depth)
        t3 = time.perf_counter()
        timings = {"preprocess": _ms(t0, t1), "inference": _ms(t1, t2),
                   "postprocess": _ms(t2, t3)}
        return DepthResult(depth, K, model_depth, model_K, timings, scale, shift, network_rgb)

    def _postprocess(self, pred: np.ndarray, K: Intrinsics, sparse_depth: np.ndarray | None
                     ) -> tuple[np.ndarray, Intrinsics, np.ndarray, Intrinsics, float, float]:
        """-> (depth, its intrinsics, depth on the model grid, its intrinsics, scale, shift)."""
        if pred.ndim != 4 or pred.shape[:2] != (1, 1):
            raise ValueError(f"model output must be (1, 1, H, W), got shape {pred.shape}")
        pred = pred[0, 0].astype(np.float32, copy=False)
        bad = int(pred.size - np.count_nonzero(np.isfinite(pred)))
        if bad:
            raise ValueError(f"model output has {bad} non-finite (NaN/inf) values")
        model_K = K.scaled(pred.shape[1], pred.shape[0])
        resized = self.config.output_resolution == "camera" and pred.shape != (K.height, K.width)
        depth = (cv2.resize(pred, (K.width, K.height), interpolation=cv2.INTER_LINEAR)
                 if resized else pred)
        scale, shift = self._alignment(depth, sparse_depth)
        out = self._finish(depth, scale, shift, owned=resized)
        if not resized:
            return out, model_K, out, model_K, scale, shift
        # The model grid gets the camera grid's fit, so both describe the same metric scene.
        return out, K, self._finish(pred, scale, shift, owned=False), model_K, scale, shift

    def _finish(self, depth: np.ndarray, scale: float, shift: float, owned: bool) -> np.ndarray:
        """Finite ``depth`` with the alignment applied, depths outside [min_depth, max_depth]
        NaN; written in place when ``owned`` (an array made here, never the model's output
        buffer, which a caller may still hold)."""
        if (scale, shift) != (1.0, 0.0):
            out = depth * np.float32(scale)
            out += np.float32(shift)
        else:
            out = depth if owned else depth.copy()
        # A network's own output range usually lies inside the bounds: two reductions then
        # replace the comparisons and the masked write (at VGA a third of postprocess).
        low, high = self.config.min_depth, self.config.max_depth
        if not (out.min() >= low and out.max() <= high):
            out[(out < low) | (out > high)] = np.nan
        return out

    def _alignment(self, depth: np.ndarray, sparse_depth: np.ndarray | None) -> tuple[float, float]:
        mode = self.config.alignment
        if mode == "none":
            return 1.0, 0.0
        if mode == "scale":
            return float(self.config.depth_scale), 0.0
        if sparse_depth is None:
            raise ValueError(f"alignment {mode!r} needs sparse metric depth, none was given")
        pred, ref = sample_at_sparse(depth, sparse_depth)
        if ref.size < self.config.min_sparse_points:
            raise ValueError(f"sparse depth has {ref.size} valid points; alignment {mode!r} needs "
                             f"at least {self.config.min_sparse_points}")
        if mode == "median":
            return fit_median_scale(pred, ref), 0.0
        return fit_scale_shift(pred, ref)


def sample_at_sparse(depth: np.ndarray, sparse_depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (depth there, sparse value) at every valid (finite, > 0) sparse pixel.

    ``sparse_depth`` may be at a different resolution than ``depth`` (camera vs
    model grid): each sparse pixel centre maps to the depth pixel containing it.
    """
    sparse_depth = np.asarray(sparse_depth, dtype=np.float32)
    if sparse_depth.ndim != 2:
        raise ValueError(f"sparse depth must be HxW, got shape {sparse_depth.shape}")
    with np.errstate(invalid="ignore"):
        ys, xs = np.nonzero(np.isfinite(sparse_depth) & (sparse_depth > 0))
    (h, w), (sh, sw) = depth.shape, sparse_depth.shape
    yd = np.minimum(((ys + 0.5) * (h / sh)).astype(np.intp), h - 1)
    xd = np.minimum(((xs + 0.5) * (w / sw)).astype(np.intp), w - 1)
    return depth[yd, xd], sparse_depth[ys, xs]
