"""What the depth node runs on each frame, outside its ROS callbacks: the model (where it
is, how it is checked before it goes live), the settings one frame needs, the cloud
message, and the frame counters its diagnostics report.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import Header

from depthkd_core.geometry import IntrinsicsBounds
from depthkd_core.inference import DepthEstimator, DepthResult, EstimatorConfig, build_point_cloud
from depthkd_core.runtime import OnnxDepthModel
from depthkd_ros.conversions import points_to_pointcloud2

PACKAGED_MODEL = Path(__file__).resolve().parent / "models" / "student.onnx"
# A real indoor frame of the bundled demo sequence: what a new model is judged on before
# the camera has sent anything.
SAMPLE_FRAME = Path(__file__).resolve().parent / "demo_data" / "rgb" / "000000.png"


def resolve_model_path(value: str) -> Path:
    """``model_path`` -> an existing file (empty = the packaged student)."""
    path = Path(value).expanduser() if value else PACKAGED_MODEL
    if not path.is_file():
        raise FileNotFoundError(f"model_path {str(path)!r} does not exist"
                                + ("" if value else " (the packaged student is missing)"))
    return path


def estimator_config(values: dict[str, Any]) -> EstimatorConfig:
    """Validate the parameter values (ValueError names the parameter; their choices are
    the node's to check) -> EstimatorConfig."""
    size = (values["model_input_height"], values["model_input_width"])
    if (size[0] == 0) != (size[1] == 0):
        raise ValueError(f"model_input_height/width must both be 0 or both > 0, got {size}")
    if values["min_depth"] >= values["max_depth"]:
        raise ValueError(f"min_depth {values['min_depth']} must be < max_depth "
                         f"{values['max_depth']}")
    return EstimatorConfig(output_resolution=values["output_resolution"],
                           alignment=values["alignment"], depth_scale=values["depth_scale"],
                           min_depth=values["min_depth"], max_depth=values["max_depth"],
                           input_size=size if size[0] else None)


def intrinsics_bounds(values: dict[str, Any]) -> IntrinsicsBounds:
    """The plausible-intrinsics parameters (ValueError names them) -> IntrinsicsBounds."""
    try:
        return IntrinsicsBounds(min_focal=values["min_focal_ratio"],
                                max_focal=values["max_focal_ratio"],
                                principal_margin=values["max_principal_offset"])
    except ValueError as exc:
        raise ValueError(f"min_focal_ratio / max_focal_ratio / max_principal_offset: "
                         f"{exc}") from None


def sample_frames() -> list[np.ndarray]:
    """The bundled real-looking frame (RGB), to judge a model on before any camera frame."""
    bgr = cv2.imread(str(SAMPLE_FRAME), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"the bundled sample frame {SAMPLE_FRAME} is missing")
    return [cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)]


def load_estimator(values: dict[str, Any], frames: list[np.ndarray]) -> DepthEstimator:
    """Load, check (input size, finite output on each of ``frames``, or on the bundled frame
    when empty) and wrap the configured model."""
    config = estimator_config(values)  # reject bad values before the slow model load
    model = OnnxDepthModel(resolve_model_path(values["model_path"]), providers=values["providers"])
    estimator = DepthEstimator(model, config)
    source = "the last received frames" if frames else "the bundled sample frame"
    try:
        estimator.dry_run(frames or sample_frames())
    except ValueError as exc:
        raise ValueError(f"model refused, judged on {source}: {exc}") from None
    return estimator


def cloud_message(result: DepthResult, rgb: np.ndarray | None, resolution: str,
                  decimation: int, header: Header | None = None) -> PointCloud2:
    """The ``points`` message of a frame: ``result``'s depth on the ``cloud_resolution``
    grid, every ``decimation``-th row and column, coloured by ``rgb`` (resized) if given."""
    depth, K = result.cloud_grid(resolution)
    colors = None if rgb is None else result.cloud_colors(resolution, rgb)
    points, colors = build_point_cloud(depth, K, decimation, colors)
    return points_to_pointcloud2(points, header, colors)


class CameraInfoMismatch(ValueError):
    """The frame's camera_info is unusable (``kind``): none pairs with it (unpaired), its
    frame_id differs (frame_id) or its intrinsics are implausible (implausible)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Pipeline:
    """Everything one frame needs; replaced as a whole so a frame never sees half a change."""

    estimator: DepthEstimator
    cloud_resolution: str
    decimation: int
    colored: bool
    cloud_rgb: bool
    model_path: str


class FrameStats:
    """Thread-safe counters; ``window`` is reset by each diagnostics message.

    Every received frame ends in exactly one of the other totals once the worker is idle:
    ``processed`` (published), ``dropped`` (replaced by a newer frame before the worker
    took it), ``skipped`` (a bad frame) or ``unwanted`` (nobody subscribed to any output,
    so no inference ran); received = processed + dropped + skipped + unwanted.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.totals = {"received": 0, "processed": 0, "dropped": 0, "skipped": 0, "unwanted": 0}
        # Why camera_info pairing skipped frames (part of ``skipped``).
        self.camera_info = {"unpaired": 0, "frame_id": 0, "implausible": 0}
        self.published = {"depth": 0, "camera_info": 0, "colored": 0, "points": 0}
        self.last_error = ""
        self._reset_window()

    def _reset_window(self) -> None:
        self.window_start = time.monotonic()
        self.window = {"frames": 0, "inference_ms": 0.0, "total_ms": 0.0}

    def add(self, key: str, reason: str = "", camera_info: str = "") -> None:
        with self.lock:
            self.totals[key] += 1
            self.last_error = reason or self.last_error
            if camera_info:
                self.camera_info[camera_info] += 1

    def frame_done(self, inference_ms: float, total_ms: float, published: list[str]) -> None:
        with self.lock:
            self.totals["processed"] += 1
            self.window["frames"] += 1
            self.window["inference_ms"] += inference_ms
            self.window["total_ms"] += total_ms
            for name in published:
                self.published[name] += 1

    def take_window(self) -> tuple[dict[str, float], float]:
        with self.lock:
            window, elapsed = self.window, time.monotonic() - self.window_start
            self._reset_window()
            return window, elapsed

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {**self.totals, "published": dict(self.published),
                    "camera_info": dict(self.camera_info), "last_error": self.last_error}
