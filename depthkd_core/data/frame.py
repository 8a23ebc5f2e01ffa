"""The ``Frame`` every reader yields, and the PNG/JSON file helpers they share.

Depth PNGs are uint16 with ``depth_m = value / scale`` and 0 = invalid (the
convention of TUM, NYU and KITTI, each with its own scale).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from depthkd_core.geometry import Intrinsics


def _size(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]}"


def _label_map(name: str, value: np.ndarray | None, rgb: np.ndarray) -> np.ndarray | None:
    if value is None:
        return None
    value = np.asarray(value)
    if value.ndim != 2 or not np.issubdtype(value.dtype, np.integer):
        raise ValueError(f"{name} must be an integer HxW array, got {value.dtype} {value.shape}")
    if value.shape != rgb.shape[:2]:
        raise ValueError(f"{name} size {_size(value)} does not match image size {_size(rgb)}")
    return value


@dataclass
class Frame:
    """One RGB image with optional metric depth, intrinsics and labels.

    ``rgb`` uint8 HxWx3 RGB; ``depth`` float32 HxW metres, 0 = invalid;
    ``semantic``/``instance`` integer HxW maps; ``intrinsics`` for this image size.
    """

    rgb: np.ndarray
    depth: np.ndarray | None = None
    intrinsics: Intrinsics | None = None
    semantic: np.ndarray | None = None
    instance: np.ndarray | None = None
    name: str = ""

    def __post_init__(self) -> None:
        rgb = np.asarray(self.rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"rgb must be a uint8 HxWx3 array, got {rgb.dtype} {rgb.shape}")
        self.rgb = rgb
        if self.depth is not None:
            depth = np.asarray(self.depth, dtype=np.float32)
            if depth.ndim != 2:
                raise ValueError(f"depth must be an HxW array, got shape {depth.shape}")
            if depth.shape != rgb.shape[:2]:
                raise ValueError(f"depth size {_size(depth)} does not match image size "
                                 f"{_size(rgb)} in frame '{self.name}'")
            if not np.all(np.isfinite(depth)) or np.any(depth < 0):
                raise ValueError(f"depth of frame '{self.name}' has NaN, inf or negative "
                                 "values; mark invalid pixels with 0")
            self.depth = depth
        self.semantic = _label_map("semantic", self.semantic, rgb)
        self.instance = _label_map("instance", self.instance, rgb)
        K = self.intrinsics
        if K is not None:
            if not isinstance(K, Intrinsics):
                raise ValueError(f"intrinsics must be an Intrinsics, got {type(K).__name__}")
            if (K.width, K.height) != (rgb.shape[1], rgb.shape[0]):
                raise ValueError(f"intrinsics size {K.width}x{K.height} does not match image "
                                 f"size {_size(rgb)} in frame '{self.name}'")

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


def read_rgb(path: Path | str) -> np.ndarray:
    """An image file as uint8 HxWx3 RGB (grey and alpha images are converted)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def write_rgb(path: Path | str, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise ValueError(f"cannot write image {path}")


def read_label_png(path: Path | str) -> np.ndarray:
    """A single-channel uint8/uint16 PNG (semantic or instance map), unchanged."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise FileNotFoundError(f"cannot read label image {path}")
    if image.ndim != 2:
        raise ValueError(f"label image {path} must have one channel, got shape {image.shape}")
    return image


def write_png(path: Path | str, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise ValueError(f"cannot write image {path}")


def read_depth_png(path: Path | str, scale: float) -> np.ndarray:
    """A uint16 depth PNG as float32 metres: ``value / scale``, 0 stays 0 (invalid)."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise FileNotFoundError(f"cannot read depth image {path}")
    if raw.dtype != np.uint16 or raw.ndim != 2:
        raise ValueError(f"depth image {path} must be single-channel uint16, "
                         f"got {raw.dtype} {raw.shape}")
    return raw.astype(np.float32) / np.float32(scale)


def write_depth_png(path: Path | str, depth: np.ndarray, scale: float) -> None:
    """Store metres as uint16 ``round(depth * scale)``; beyond 65535 becomes invalid (0)."""
    value = np.round(np.asarray(depth, dtype=np.float64) * scale)
    value[(value > np.iinfo(np.uint16).max) | ~np.isfinite(value)] = 0
    write_png(path, value.astype(np.uint16))


def intrinsics_to_dict(K: Intrinsics) -> dict[str, float]:
    return {"fx": K.fx, "fy": K.fy, "cx": K.cx, "cy": K.cy, "width": K.width, "height": K.height}


def intrinsics_from_dict(data: dict, where: str) -> Intrinsics:
    missing = [k for k in ("fx", "fy", "cx", "cy", "width", "height") if k not in data]
    if missing:
        raise ValueError(f"intrinsics in {where} lack {', '.join(missing)}")
    return Intrinsics(fx=data["fx"], fy=data["fy"], cx=data["cx"], cy=data["cy"],
                      width=data["width"], height=data["height"])


def load_intrinsics_json(path: Path) -> Intrinsics | dict[str, Intrinsics]:
    """``intrinsics.json``: one camera ``{fx, fy, cx, cy, width, height}`` for the whole
    folder, or ``{"frames": {name: {...}}}`` with one camera per frame name (file stem)."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if "frames" in data:
        return {name: intrinsics_from_dict(value, f"{path} frame '{name}'")
                for name, value in data["frames"].items()}
    return intrinsics_from_dict(data, str(path))
