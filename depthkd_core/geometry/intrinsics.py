"""Pinhole camera intrinsics with the ROS/OpenCV pixel-centre convention.

The centre of the first pixel is (0, 0), so a pixel spans [u - 0.5, u + 0.5].
Resizing by s maps the continuous coordinate x + 0.5 to s * (x + 0.5), which is
the mapping ``cv2.resize`` uses; hence ``cx' = (cx + 0.5) * s - 0.5``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _positive_int(name: str, value: float) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not number.is_integer() or number <= 0:
        raise ValueError(f"intrinsics {name} must be a positive integer, got {value!r}")
    return int(number)


@dataclass(frozen=True)
class Intrinsics:
    """Focal lengths and principal point in pixels, for an image of ``width`` x ``height``.

    Frozen (hence hashable) so per-camera results such as ray grids can be cached.
    """

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def __post_init__(self) -> None:
        for name in ("fx", "fy", "cx", "cy"):
            value = getattr(self, name)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"intrinsics {name} must be a number, got {value!r}") from None
            if not math.isfinite(value):
                raise ValueError(f"intrinsics {name} must be finite, got {value!r}")
            object.__setattr__(self, name, value)
        for name in ("fx", "fy"):
            if getattr(self, name) <= 0.0:
                raise ValueError(f"intrinsics {name} must be > 0, got {getattr(self, name)!r}")
        object.__setattr__(self, "width", _positive_int("width", self.width))
        object.__setattr__(self, "height", _positive_int("height", self.height))

    def scaled(self, width: int, height: int) -> Intrinsics:
        """Intrinsics of this camera's image resized to ``width`` x ``height``."""
        width = _positive_int("width", width)
        height = _positive_int("height", height)
        sx, sy = width / self.width, height / self.height
        return Intrinsics(fx=self.fx * sx, fy=self.fy * sy,
                          cx=(self.cx + 0.5) * sx - 0.5, cy=(self.cy + 0.5) * sy - 0.5,
                          width=width, height=height)

    def cropped(self, x0: int, y0: int, width: int, height: int) -> Intrinsics:
        """Intrinsics of the sub-image ``[y0:y0+height, x0:x0+width]`` (must lie inside)."""
        width = _positive_int("crop width", width)
        height = _positive_int("crop height", height)
        if x0 < 0 or y0 < 0 or x0 + width > self.width or y0 + height > self.height:
            raise ValueError(f"crop x0={x0}, y0={y0}, width={width}, height={height} does not "
                             f"lie inside the {self.width}x{self.height} image")
        return Intrinsics(fx=self.fx, fy=self.fy, cx=self.cx - x0, cy=self.cy - y0,
                          width=width, height=height)

    def matrix(self) -> np.ndarray:
        """The 3x3 camera matrix K (float64)."""
        return np.array([[self.fx, 0.0, self.cx],
                         [0.0, self.fy, self.cy],
                         [0.0, 0.0, 1.0]], dtype=np.float64)

    def as_tuple(self) -> tuple[float, float, float, float]:
        """``(fx, fy, cx, cy)``, the order ``DepthDataset`` stores intrinsics in."""
        return (self.fx, self.fy, self.cx, self.cy)

    @classmethod
    def from_matrix(cls, K: np.ndarray | Sequence[float], width: int, height: int) -> Intrinsics:
        """From a 3x3 matrix or the row-major 9-list of ``sensor_msgs/CameraInfo.k``."""
        K = np.asarray(K, dtype=np.float64)
        if K.size != 9:
            raise ValueError(f"camera matrix must have 9 entries (3x3), got shape {K.shape}")
        K = K.reshape(3, 3)
        if not np.any(K):
            raise ValueError("camera matrix is all zeros (uncalibrated camera)")
        if K[0, 1] != 0.0 or K[1, 0] != 0.0 or np.any(K[2] != (0.0, 0.0, 1.0)):
            raise ValueError(f"camera matrix is not a skew-free pinhole matrix: {K.tolist()}")
        return cls(fx=K[0, 0], fy=K[1, 1], cx=K[0, 2], cy=K[1, 2], width=width, height=height)


@dataclass(frozen=True)
class IntrinsicsBounds:
    """What a real pinhole camera's intrinsics look like against its image size.

    A camera_info can be finite and positive and still absurd (fx = 1e-30 puts
    back-projected points at 1e32 m). ``min_focal`` / ``max_focal`` bound the focal
    length in image sizes (fx / width, fy / height): 0.1 is a 157 deg field of
    view, wider than a rectified pinhole image is usable at, and 100 is 0.6 deg,
    narrower than long telephoto lenses. ``principal_margin``: the principal point
    lies at most this many image widths (heights) from the image centre; 1.0 lets it
    sit up to half an image outside the image, as crops of a larger frame can.
    """

    min_focal: float = 0.1
    max_focal: float = 100.0
    principal_margin: float = 1.0

    def __post_init__(self) -> None:
        if not (0.0 < self.min_focal < self.max_focal < math.inf):
            raise ValueError(f"need 0 < min_focal < max_focal < inf, got min_focal="
                             f"{self.min_focal}, max_focal={self.max_focal}")
        if not (0.0 <= self.principal_margin < math.inf):
            raise ValueError(f"principal_margin must be finite and >= 0, "
                             f"got {self.principal_margin}")

    def check(self, K: Intrinsics) -> None:
        """ValueError naming the first implausible value of ``K``."""
        for name, focal, size, side in (("fx", K.fx, K.width, "width"),
                                        ("fy", K.fy, K.height, "height")):
            ratio = focal / size
            if not self.min_focal <= ratio <= self.max_focal:
                raise ValueError(f"{name}={focal:g} is {ratio:.3g} image {side}s ({size} px); "
                                 f"a plausible focal length is {self.min_focal:g} to "
                                 f"{self.max_focal:g} (min_focal_ratio, max_focal_ratio)")
        for name, centre, size, side in (("cx", K.cx, K.width, "width"),
                                         ("cy", K.cy, K.height, "height")):
            offset = abs(centre - (size - 1) / 2) / size
            if offset > self.principal_margin:
                raise ValueError(f"{name}={centre:g} is {offset:.3g} image {side}s ({size} px) "
                                 f"from the image centre; at most {self.principal_margin:g} is "
                                 "plausible (max_principal_offset)")
