"""Dataset readers: each is a ``Sequence[Frame]`` in a sorted, deterministic order.

Folder readers live here; ``nyu.NyuMat`` and ``rosbag.RosbagImages`` in their own
modules. All are registered in ``READERS``; ``build_reader(kind, root, **kw)``.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from depthkd_core.data.frame import (Frame, intrinsics_from_dict, load_intrinsics_json,
                                     read_depth_png, read_label_png, read_rgb)
from depthkd_core.geometry import Intrinsics
from depthkd_core.registry import Registry

READERS: Registry = Registry("reader")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TUM_INTRINSICS = Intrinsics(fx=525.0, fy=525.0, cx=319.5, cy=239.5, width=640, height=480)
NYU_INTRINSICS = Intrinsics(fx=518.8579, fy=519.4696, cx=325.5824, cy=253.7362,
                            width=640, height=480)

IntrinsicsArg = Intrinsics | dict | None


def build_reader(kind: str, root: str | Path, **kwargs: Any) -> Sequence[Frame]:
    """The reader registered as ``kind`` (sim, images, tum, nyu_mat, nyu_png, kitti, rosbag)."""
    return READERS.get(kind)(root, **kwargs)


class FrameReader(Sequence[Frame]):
    """Indexing, length and bounds checks; subclasses fill ``items`` and define ``load``."""

    items: list

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Frame:  # type: ignore[override]
        i = operator.index(index)
        n = len(self.items)
        if not -n <= i < n:
            raise IndexError(f"frame {index} out of range: {type(self).__name__} has {n} frames")
        return self.load(self.items[i % n])

    def load(self, item: Any) -> Frame:
        raise NotImplementedError


def natural_key(path: Path) -> tuple:
    """Sort key that orders ``img2`` before ``img10``."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


def require_dir(root: str | Path, what: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{what}: no such folder: {root}")
    return root


def list_images(folder: Path, prefix: str = "") -> list[Path]:
    files = [p for p in folder.iterdir()
             if p.suffix.lower() in IMAGE_SUFFIXES and p.name.startswith(prefix)]
    return sorted(files, key=natural_key)


def require_items(items: list, where: Path, what: str) -> list:
    if not items:
        raise ValueError(f"{what}: no frames found in {where}")
    return items


def camera_for(value: IntrinsicsArg, default: Intrinsics | None, width: int,
               height: int) -> Intrinsics | None:
    """Given intrinsics (or a dict of them) else ``default`` scaled to the image size.

    Scaling assumes the image was resized from the default camera's size, not cropped.
    """
    if isinstance(value, dict):
        value = intrinsics_from_dict(value, "the intrinsics argument")
    K = value if value is not None else default
    if K is None or (K.width, K.height) == (width, height):
        return K
    return K.scaled(width, height)


@READERS.register("sim")
class SimFolder(FrameReader):
    """A folder written by ``simulator.write_dataset`` (layout in docs/data.md)."""

    def __init__(self, root: str | Path) -> None:
        self.root = require_dir(root, "SimFolder")
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"SimFolder: {meta_path} is missing "
                                    "(not a simulator dataset)")
        self.meta = json.loads(meta_path.read_text())
        self.depth_scale = float(self.meta.get("depth_scale", 1000.0))
        rgb_dir = require_dir(self.root / "rgb", "SimFolder")
        self.items = require_items(list_images(rgb_dir), rgb_dir, "SimFolder")
        path = self.root / "intrinsics.json"
        self.intrinsics = load_intrinsics_json(path) if path.is_file() else None

    def _optional(self, sub: str, stem: str) -> Path | None:
        """``root/sub/stem.png`` when the ``sub`` folder exists (then the file must too)."""
        return self.root / sub / f"{stem}.png" if (self.root / sub).is_dir() else None

    def load(self, rgb_path: Path) -> Frame:
        stem = rgb_path.stem
        depth, semantic, instance = (self._optional(s, stem)
                                     for s in ("depth", "semantic", "instance"))
        K = self.intrinsics.get(stem) if isinstance(self.intrinsics, dict) else self.intrinsics
        return Frame(rgb=read_rgb(rgb_path),
                     depth=read_depth_png(depth, self.depth_scale) if depth else None,
                     intrinsics=K,
                     semantic=read_label_png(semantic) if semantic else None,
                     instance=read_label_png(instance) if instance else None,
                     name=stem)


@READERS.register("images")
class ImageFolder(FrameReader):
    """Any folder of .png/.jpg images, unlabelled; intrinsics from ``intrinsics`` or an
    optional ``intrinsics.json`` beside the images (one camera, or per file stem).
    ``names``: only these files of the folder, in this order (each must exist)."""

    def __init__(self, root: str | Path, intrinsics: IntrinsicsArg = None,
                 names: Sequence[str] | None = None) -> None:
        self.root = require_dir(root, "ImageFolder")
        if names is None:
            self.items = require_items(list_images(self.root), self.root, "ImageFolder")
        else:
            missing = [name for name in names if not (self.root / name).is_file()]
            if missing:
                raise FileNotFoundError(f"ImageFolder: {missing} not in {self.root}")
            self.items = require_items([self.root / name for name in names], self.root,
                                       "ImageFolder")
        path = self.root / "intrinsics.json"
        if intrinsics is None and path.is_file():
            intrinsics = load_intrinsics_json(path)
        elif isinstance(intrinsics, dict):
            intrinsics = intrinsics_from_dict(intrinsics, "the intrinsics argument")
        self.intrinsics = intrinsics

    def load(self, path: Path) -> Frame:
        K = self.intrinsics
        if isinstance(K, dict):
            K = K.get(path.stem)
        return Frame(rgb=read_rgb(path), intrinsics=K, name=path.stem)


def read_tum_list(path: Path) -> tuple[np.ndarray, list[Path]]:
    """A TUM ``rgb.txt``/``depth.txt``: ``timestamp filename`` lines, ``#`` comments."""
    stamps, files = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split()
        try:
            stamps.append(float(fields[0]))
            files.append(path.parent / fields[1])
        except (ValueError, IndexError):
            raise ValueError(f"{path}:{number}: expected 'timestamp filename', "
                             f"got {line!r}") from None
    return np.array(stamps, dtype=np.float64), files


def associate(rgb_stamps: np.ndarray, depth_stamps: np.ndarray,
              max_dt: float) -> list[tuple[int, int]]:
    """One-to-one nearest-timestamp pairs within ``max_dt`` seconds, in rgb order
    (greedy by time difference, as TUM's associate.py)."""
    if len(rgb_stamps) == 0 or len(depth_stamps) == 0:
        return []
    order = np.argsort(depth_stamps)
    stamps = depth_stamps[order]
    after = np.clip(np.searchsorted(stamps, rgb_stamps), 0, len(stamps) - 1)
    before = np.maximum(after - 1, 0)
    pick = np.where(np.abs(stamps[before] - rgb_stamps) <= np.abs(stamps[after] - rgb_stamps),
                    before, after)
    dt = np.abs(stamps[pick] - rgb_stamps)
    by_dt = np.argsort(dt, kind="stable")
    _, first = np.unique(pick[by_dt], return_index=True)   # closest rgb wins each depth
    keep = np.sort(by_dt[first])
    return [(int(i), int(order[pick[i]])) for i in keep if dt[i] <= max_dt]


def _stamp(path: Path) -> float | None:
    try:
        return float(path.stem)
    except ValueError:
        return None


def _pair_folders(rgb: list[Path], depth: list[Path], max_dt: float) -> list[tuple[Path, Path]]:
    """Pair by timestamp file names (TUM's ``1305031102.175304.png``) else by equal stems."""
    rgb_t, depth_t = [_stamp(p) for p in rgb], [_stamp(p) for p in depth]
    if None not in rgb_t and None not in depth_t:
        pairs = associate(np.array(rgb_t), np.array(depth_t), max_dt)
        return [(rgb[i], depth[j]) for i, j in pairs]
    by_stem = {p.stem: p for p in depth}
    return [(p, by_stem[p.stem]) for p in rgb if p.stem in by_stem]


@READERS.register("tum")
class TumFolder(FrameReader):
    """TUM RGB-D: ``rgb.txt`` + ``depth.txt`` (associated by timestamp within ``max_dt``),
    or ``rgb/`` + ``depth/`` folders, or ``*_color.png`` + ``*_depth.png`` pairs.

    Depth is ``value / depth_scale`` (TUM: 5000 per metre). Intrinsics default to
    TUM's fx = fy = 525, cx = 319.5, cy = 239.5 (640x480), overridable.
    """

    def __init__(self, root: str | Path, depth_scale: float = 5000.0,
                 intrinsics: IntrinsicsArg = None, max_dt: float = 0.02) -> None:
        self.root = require_dir(root, "TumFolder")
        self.depth_scale = float(depth_scale)
        self.intrinsics = intrinsics
        self.items = require_items(self._pairs(max_dt), self.root, "TumFolder")

    def _pairs(self, max_dt: float) -> list[tuple[Path, Path]]:
        root = self.root
        if (root / "rgb.txt").is_file() and (root / "depth.txt").is_file():
            rgb_t, rgb = read_tum_list(root / "rgb.txt")
            depth_t, depth = read_tum_list(root / "depth.txt")
            return [(rgb[i], depth[j]) for i, j in associate(rgb_t, depth_t, max_dt)]
        if (root / "rgb").is_dir() and (root / "depth").is_dir():
            return _pair_folders(list_images(root / "rgb"), list_images(root / "depth"), max_dt)
        colour = [p for p in list_images(root) if p.stem.endswith("_color")]
        pairs = [(p, p.with_name(p.name.replace("_color", "_depth", 1))) for p in colour]
        return [(c, d) for c, d in pairs if d.is_file()]

    def load(self, item: tuple[Path, Path]) -> Frame:
        rgb_path, depth_path = item
        rgb = read_rgb(rgb_path)
        K = camera_for(self.intrinsics, TUM_INTRINSICS, rgb.shape[1], rgb.shape[0])
        return Frame(rgb=rgb, depth=read_depth_png(depth_path, self.depth_scale),
                     intrinsics=K, name=rgb_path.stem)


@READERS.register("nyu_png")
class NyuPngFolder(FrameReader):
    """NYU-v2 test sets as image files: ``rgb_XXXXX.jpg|png`` beside ``depth_XXXXX.png``
    or ``sync_depth_XXXXX.png`` (uint16 millimetres: ``depth_scale=1000``), searched
    recursively (e.g. per-scene folders). Intrinsics default to NYU's Kinect camera."""

    def __init__(self, root: str | Path, depth_scale: float = 1000.0,
                 intrinsics: IntrinsicsArg = None) -> None:
        self.root = require_dir(root, "NyuPngFolder")
        self.depth_scale = float(depth_scale)
        self.intrinsics = intrinsics
        rgbs = sorted((p for p in self.root.rglob("rgb_*") if p.suffix.lower() in IMAGE_SUFFIXES),
                      key=lambda p: (natural_key(p.parent), natural_key(p)))
        self.items = require_items([(p, self._depth_of(p)) for p in rgbs], self.root,
                                   "NyuPngFolder")

    @staticmethod
    def _depth_of(rgb: Path) -> Path:
        index = rgb.stem[len("rgb_"):]
        candidates = [rgb.with_name(f"{prefix}{index}.png") for prefix in ("depth_", "sync_depth_")]
        for path in candidates:
            if path.is_file():
                return path
        raise FileNotFoundError(f"NyuPngFolder: no depth for {rgb} (looked for "
                                f"{', '.join(p.name for p in candidates)})")

    def load(self, item: tuple[Path, Path]) -> Frame:
        rgb_path, depth_path = item
        rgb = read_rgb(rgb_path)
        K = camera_for(self.intrinsics, NYU_INTRINSICS, rgb.shape[1], rgb.shape[0])
        name = str(rgb_path.relative_to(self.root).with_suffix(""))
        return Frame(rgb=rgb, depth=read_depth_png(depth_path, self.depth_scale),
                     intrinsics=K, name=name)
