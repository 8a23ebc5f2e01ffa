"""numpy-only camera geometry: intrinsics, back-projection, depth alignment, colouring.

The live ROS node imports this package, so it must never import torch or cv2.
"""

from depthkd_core.geometry.alignment import (ALIGN_MODES, align_depth, fit_median_scale,
                                              fit_scale_shift)
from depthkd_core.geometry.backproject import backproject_depth
from depthkd_core.geometry.colorize import TURBO_LUT, colorize_depth
from depthkd_core.geometry.intrinsics import Intrinsics, IntrinsicsBounds

__all__ = [
    "ALIGN_MODES",
    "Intrinsics",
    "IntrinsicsBounds",
    "TURBO_LUT",
    "align_depth",
    "backproject_depth",
    "colorize_depth",
    "fit_median_scale",
    "fit_scale_shift",
]
