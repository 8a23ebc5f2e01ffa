"""Data: the procedural simulator, dataset readers and the torch ``DepthDataset``.

Importing this package imports only the readers (numpy, OpenCV): ``DepthDataset``
(torch) and the simulator (tqdm, the renderer) are loaded on first use (PEP 562),
so ``depthkd simulate``, the readers and the ROS nodes that import
``depthkd_core.data.frame`` (this package's ``__init__`` runs first) stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

from depthkd_core.data.frame import Frame
from depthkd_core.data.kitti import KittiDepth
from depthkd_core.data.nyu import NyuMat
from depthkd_core.data.readers import (READERS, ImageFolder, NyuPngFolder, SimFolder, TumFolder,
                                       build_reader)
from depthkd_core.data.rosbag import RosbagImages

_LAZY = {"DepthDataset": "depthkd_core.data.dataset",
         **{name: "depthkd_core.data.simulator" for name in
            ("STYLES", "SceneStyle", "render_frame", "render_sequence", "write_dataset")}}

__all__ = [
    "READERS", "STYLES", "DepthDataset", "Frame", "ImageFolder", "KittiDepth", "NyuMat",
    "NyuPngFolder", "RosbagImages", "SceneStyle", "SimFolder", "TumFolder", "build_reader",
    "render_frame", "render_sequence", "write_dataset",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
