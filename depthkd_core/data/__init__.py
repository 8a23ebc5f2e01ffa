"""Data: the procedural simulator, dataset readers and the torch ``DepthDataset``.

Importing this package never imports torch: ``DepthDataset`` is loaded on first
use (PEP 562), so ``depthkd simulate`` and the readers stay light.
"""

from __future__ import annotations

from typing import Any

from depthkd_core.data.frame import Frame
from depthkd_core.data.kitti import KittiDepth
from depthkd_core.data.nyu import NyuMat
from depthkd_core.data.readers import (READERS, ImageFolder, NyuPngFolder, SimFolder, TumFolder,
                                       build_reader)
from depthkd_core.data.rosbag import RosbagImages
from depthkd_core.data.simulator import (STYLES, SceneStyle, render_frame, render_sequence,
                                         write_dataset)

__all__ = [
    "READERS", "STYLES", "DepthDataset", "Frame", "ImageFolder", "KittiDepth", "NyuMat",
    "NyuPngFolder", "RosbagImages", "SceneStyle", "SimFolder", "TumFolder", "build_reader",
    "render_frame", "render_sequence", "write_dataset",
]


def __getattr__(name: str) -> Any:
    if name == "DepthDataset":
        from depthkd_core.data.dataset import DepthDataset

        return DepthDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
