"""Keyframe selection and the crash-safe, bounded on-disk keyframe store (numpy + OpenCV, no torch).

Store layout (docs/online.md): ``root/KEY.png`` (RGB), ``root/KEY.json`` (intrinsics, stamp,
teacher info), ``root/KEY.teacher.npy`` (teacher depth float32). KEY is a zero-padded
monotonic sequence number. Every file is written as a hidden temp file, fsynced, then
``os.replace``d, and ``KEY.json`` is written last: a key exists exactly when its JSON does,
so a crash at any point leaves either a whole frame or nothing visible.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections import deque
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from depthkd_core.atomic import TMP_SUFFIX, atomic_open
from depthkd_core.data.frame import Frame, intrinsics_from_dict, intrinsics_to_dict
from depthkd_core.geometry import Intrinsics

THUMB_SIZE = (32, 24)  # (width, height) of the novelty thumbnails
KEY_DIGITS = 10


def _thumbnail(rgb: np.ndarray) -> np.ndarray:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"keyframe image must be uint8 HxWx3 RGB, got {rgb.dtype} {rgb.shape}")
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, THUMB_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32)


class KeyframeSelector:
    """Keeps a frame when ``min_interval_s`` has passed since the last keyframe and it is novel.

    novelty = min over the last ``history`` keyframes of mean |a - b| / 255 of 32x24 grey
    thumbnails; a frame is novel when novelty >= ``novelty_threshold``. A stamp earlier
    than the last keyframe's (a restarted bag, a clock jump) passes the interval test.
    """

    def __init__(self, min_interval_s: float = 1.0, novelty_threshold: float = 0.08,
                 history: int = 8) -> None:
        if min_interval_s < 0 or not 0.0 <= novelty_threshold <= 1.0 or history < 1:
            raise ValueError(f"KeyframeSelector needs min_interval_s >= 0, novelty_threshold in "
                             f"[0, 1], history >= 1; got {min_interval_s}, {novelty_threshold}, {history}")
        self.min_interval_s, self.novelty_threshold = min_interval_s, novelty_threshold
        self._thumbs: deque[np.ndarray] = deque(maxlen=history)
        self._last_stamp: float | None = None

    def novelty(self, rgb: np.ndarray) -> float:
        """Novelty of ``rgb`` against the kept thumbnails (1.0 when there are none)."""
        thumb = _thumbnail(rgb)
        if not self._thumbs:
            return 1.0
        return float(min(np.abs(thumb - t).mean() for t in self._thumbs) / 255.0)

    def accept(self, rgb: np.ndarray, stamp_s: float) -> bool:
        """True (and remember the frame) when ``rgb`` at ``stamp_s`` should become a keyframe."""
        last = self._last_stamp
        if last is not None and last <= stamp_s < last + self.min_interval_s:
            return False
        if self.novelty(rgb) < self.novelty_threshold:
            return False
        self._thumbs.append(_thumbnail(rgb))
        self._last_stamp = stamp_s
        return True


class StoreFullError(OSError):
    """The disk is full or below ``min_free_bytes``: nothing was written, the store is intact."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a hidden temp file + fsync + os.replace; ENOSPC -> StoreFullError."""
    try:
        with atomic_open(path) as handle:
            handle.write(data)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StoreFullError(errno.ENOSPC, f"disk full while writing {path}") from exc
        raise


def _encode_png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"cannot encode a {rgb.shape} image as PNG")
    return buf.tobytes()


def _encode_npy(array: np.ndarray) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class KeyframeStore:
    """Bounded on-disk keyframes; everything is rebuilt from the files, so it survives restarts.

    max_frames: the oldest keys are evicted beyond it. min_free_bytes: ``add`` refuses
    (StoreFullError, nothing written) when the free space after the frame would fall below.
    holdout_every: every ``holdout_every``-th sequence number (seq % holdout_every == 0) is
    a held-out key for the gate, so the split never changes as frames come and go.
    writer: the one process that adds frames; only it removes stray temp files and
    half-committed frames on open (a reader must not delete a writer's file in flight).
    """

    def __init__(self, root: str | Path, max_frames: int = 500, min_free_bytes: int = 100 * 2**20,
                 holdout_every: int = 5, writer: bool = True) -> None:
        if max_frames < 1 or min_free_bytes < 0 or holdout_every < 2:
            raise ValueError(f"KeyframeStore needs max_frames >= 1, min_free_bytes >= 0, "
                             f"holdout_every >= 2; got {max_frames}, {min_free_bytes}, {holdout_every}")
        self.root = Path(root)
        self.max_frames, self.min_free_bytes, self.holdout_every = max_frames, min_free_bytes, holdout_every
        self.writer = writer
        if writer:
            self.root.mkdir(parents=True, exist_ok=True)
            self._clean()
        elif not self.root.is_dir():
            raise FileNotFoundError(f"keyframe store {self.root} does not exist")
        keys = self.keys()
        self._next = int(keys[-1]) + 1 if keys else 0

    # -- files ------------------------------------------------------------
    def _path(self, key: str, suffix: str) -> Path:
        return self.root / f"{key}{suffix}"

    def _clean(self) -> None:
        """Remove temp files and the pieces of frames whose JSON never got committed."""
        committed = set(self.keys())
        for path in self.root.iterdir():
            stem = path.name.split(".")[0]
            if path.name.endswith(TMP_SUFFIX) or (stem.isdigit() and stem not in committed):
                path.unlink(missing_ok=True)

    def keys(self) -> list[str]:
        """Committed keys, oldest first."""
        return sorted(p.stem for p in self.root.glob("*.json")
                      if p.stem.isdigit() and len(p.stem) == KEY_DIGITS)

    def train_keys(self) -> list[str]:
        return [k for k in self.keys() if int(k) % self.holdout_every != 0]

    def holdout_keys(self) -> list[str]:
        return [k for k in self.keys() if int(k) % self.holdout_every == 0]

    def _meta(self, key: str) -> dict[str, Any]:
        path = self._path(key, ".json")
        if not path.is_file():
            raise FileNotFoundError(f"keyframe {key} is not in the store {self.root}")
        return json.loads(path.read_text())

    # -- writing ----------------------------------------------------------
    def _check_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free - needed < self.min_free_bytes:
            raise StoreFullError(errno.ENOSPC, f"keyframe store {self.root}: {free} bytes free, "
                                 f"a frame needs ~{needed} and min_free_bytes is {self.min_free_bytes}")

    def add(self, rgb: np.ndarray, K: Intrinsics, stamp_s: float) -> str:
        """Store a keyframe atomically and return its key; evicts the oldest beyond max_frames."""
        if not self.writer:
            raise ValueError(f"keyframe store {self.root} was opened read-only (writer=False)")
        _thumbnail(rgb)  # validates the image
        if (K.width, K.height) != (rgb.shape[1], rgb.shape[0]):
            raise ValueError(f"intrinsics are for {K.width}x{K.height}, image is "
                             f"{rgb.shape[1]}x{rgb.shape[0]}")
        png = _encode_png(rgb)
        meta = json.dumps({"intrinsics": intrinsics_to_dict(K), "stamp": float(stamp_s)}).encode()
        self._check_space(len(png) + len(meta))
        key = f"{self._next:0{KEY_DIGITS}d}"
        try:
            _write_atomic(self._path(key, ".png"), png)
            _write_atomic(self._path(key, ".json"), meta)  # the commit point
        except OSError:
            self._path(key, ".png").unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)
        self._next += 1
        self._evict()
        return key

    def _evict(self) -> None:
        keys = self.keys()
        for key in keys[:max(0, len(keys) - self.max_frames)]:
            self.remove(key)

    def remove(self, key: str) -> None:
        """Delete a keyframe (its JSON first, so it vanishes before its data)."""
        for suffix in (".json", ".png", ".teacher.npy"):
            self._path(key, suffix).unlink(missing_ok=True)

    def set_teacher_depth(self, key: str, depth: np.ndarray, is_inverse: bool = False,
                          is_metric: bool | None = None) -> None:
        """Store the teacher's output for ``key`` (HxW float32; is_metric defaults to not is_inverse)."""
        depth = np.asarray(depth, dtype=np.float32)
        if depth.ndim != 2 or not np.isfinite(depth).any():
            raise ValueError(f"teacher depth for {key} must be a finite HxW array, got shape {depth.shape}")
        meta = self._meta(key)
        data = _encode_npy(depth)
        self._check_space(len(data))
        _write_atomic(self._path(key, ".teacher.npy"), data)
        meta["teacher"] = {"is_inverse": bool(is_inverse),
                           "is_metric": (not is_inverse) if is_metric is None else bool(is_metric)}
        _write_atomic(self._path(key, ".json"), json.dumps(meta).encode())

    # -- reading ----------------------------------------------------------
    def load(self, key: str) -> Frame:
        """The keyframe's image and intrinsics (depth None)."""
        meta = self._meta(key)
        image = cv2.imread(str(self._path(key, ".png")), cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(f"keyframe image {self._path(key, '.png')} is missing or unreadable")
        K = intrinsics_from_dict(meta["intrinsics"], str(self._path(key, ".json")))
        return Frame(rgb=cv2.cvtColor(image, cv2.COLOR_BGR2RGB), intrinsics=K, name=key)

    def stamp(self, key: str) -> float:
        return float(self._meta(key)["stamp"])

    def teacher_info(self, key: str) -> dict[str, bool] | None:
        """``{"is_inverse", "is_metric"}`` of the stored teacher depth, None when there is none."""
        info = self._meta(key).get("teacher")
        return info if info is not None and self._path(key, ".teacher.npy").is_file() else None

    def teacher_depth(self, key: str) -> np.ndarray | None:
        if self.teacher_info(key) is None:
            return None
        return np.load(self._path(key, ".teacher.npy"), allow_pickle=False)

    def pending_teacher(self) -> list[str]:
        """Keys without a teacher depth, oldest first."""
        pending = []
        for key in self.keys():
            try:
                if "teacher" not in self._meta(key):
                    pending.append(key)
            except FileNotFoundError:  # evicted by the writer since keys() listed it
                continue
        return pending
