"""The labelled NYU-Depth-v2 file (Silberman et al., ECCV 2012), read with h5py."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from depthkd_core.data.frame import Frame
from depthkd_core.data.readers import (NYU_INTRINSICS, READERS, FrameReader, IntrinsicsArg,
                                       camera_for)


@READERS.register("nyu_mat")
class NyuMat(FrameReader):
    """``nyu_depth_v2_labeled.mat`` (MATLAB v7.3, i.e. HDF5).

    MATLAB stores arrays column-major, so h5py sees ``images`` as (N, 3, W, H) uint8
    and ``depths`` (metres), ``labels``, ``instances`` as (N, W, H); each frame is
    transposed back to H x W. ``indices`` (0-based; the official ``splits.mat``
    is 1-based) selects a split. The file is opened lazily once per process, so
    the reader can be handed to DataLoader workers.
    """

    def __init__(self, path: str | Path, indices: Sequence[int] | None = None,
                 intrinsics: IntrinsicsArg = None) -> None:
        import h5py  # optional dependency (extra "data")

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"NyuMat: no such file: {self.path}")
        self.intrinsics = intrinsics
        with h5py.File(self.path, "r") as f:
            missing = [k for k in ("images", "depths") if k not in f]
            if missing:
                raise ValueError(f"NyuMat: {self.path} lacks dataset(s) {missing}; "
                                 f"has {sorted(f.keys())}")
            images, depths = f["images"].shape, f["depths"].shape
            self.has_labels, self.has_instances = "labels" in f, "instances" in f
        if len(images) != 4 or images[1] != 3 or depths != (images[0],) + images[2:]:
            raise ValueError(f"NyuMat: {self.path} has images {images} and depths {depths}; "
                             "expected (N, 3, W, H) and (N, W, H)")
        n = images[0]
        chosen = list(range(n)) if indices is None else [int(i) for i in indices]
        bad = [i for i in chosen if not 0 <= i < n]
        if bad:
            raise ValueError(f"NyuMat: indices {bad[:5]} out of range for {n} frames")
        if not chosen:
            raise ValueError(f"NyuMat: no frames selected from {self.path}")
        self.items = chosen
        self._file: Any = None
        self._pid = -1

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, -1   # h5py handles do not survive pickling
        return state

    def _handle(self) -> Any:
        if self._file is None or self._pid != os.getpid():
            import h5py

            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def load(self, index: int) -> Frame:
        f = self._handle()
        rgb = np.ascontiguousarray(f["images"][index].transpose(2, 1, 0))
        labels = f["labels"][index].T.astype(np.int32) if self.has_labels else None
        instances = f["instances"][index].T.astype(np.int32) if self.has_instances else None
        return Frame(rgb=rgb, depth=f["depths"][index].T.astype(np.float32),
                     intrinsics=camera_for(self.intrinsics, NYU_INTRINSICS, rgb.shape[1],
                                           rgb.shape[0]),
                     semantic=labels, instance=instances, name=f"{index:05d}")
