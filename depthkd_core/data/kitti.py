"""KITTI depth completion / prediction ground truth (Uhrig et al., 3DV 2017).

Depth PNGs are uint16 with ``depth_m = value / 256`` and 0 = no LiDAR return.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from depthkd_core.data.frame import Frame, read_depth_png, read_rgb
from depthkd_core.data.readers import (READERS, FrameReader, list_images, natural_key,
                                       require_dir, require_items)
from depthkd_core.geometry import Intrinsics

Item = tuple[Path, Path, np.ndarray | None]   # depth file, image file, 3x3 K or None


def read_calib(path: Path) -> dict[str, np.ndarray]:
    """``key: numbers`` lines of a KITTI calibration file (non-numeric lines skipped)."""
    calib = {}
    for line in path.read_text().splitlines():
        key, _, values = line.partition(":")
        try:
            calib[key.strip()] = np.array([float(v) for v in values.split()])
        except ValueError:
            continue
    return calib


def _first_file(candidates: list[Path]) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


@READERS.register("kitti")
class KittiDepth(FrameReader):
    """KITTI depth PNGs paired with their colour images, in one of three layouts:

    - depth selection: ``root/groundtruth_depth/*.png`` with ``root/image/`` (the name's
      ``groundtruth_depth`` replaced by ``image``) and optional ``root/intrinsics/*.txt``;
    - per drive: ``root/**/<drive>/proj_depth/groundtruth/image_0X/*.png`` with images in
      ``<drive>/image_0X/data/`` under ``root`` or ``image_root`` (raw-data tree
      ``<date>/<drive>/``); intrinsics from ``calib_cam_to_cam.txt`` (``P_rect_0X``);
    - a plain folder of depth PNGs with same-named images in ``image_root``.

    Intrinsics are None when no calibration is found.
    """

    def __init__(self, root: str | Path, image_root: str | Path | None = None,
                 depth_scale: float = 256.0) -> None:
        self.root = require_dir(root, "KittiDepth")
        self.image_root = require_dir(image_root, "KittiDepth") if image_root else None
        self.depth_scale = float(depth_scale)
        if (self.root / "groundtruth_depth").is_dir():
            items = self._selection_items()
        elif any(self.root.glob("**/proj_depth/groundtruth")):
            items = self._drive_items()
        else:
            if self.image_root is None:
                raise ValueError(f"KittiDepth: {self.root} has neither groundtruth_depth/ nor "
                                 "proj_depth/groundtruth/; pass image_root for a plain folder")
            items = [(d, self._image(d, [self.image_root / d.name]), None)
                     for d in list_images(self.root)]
        self.items = require_items(items, self.root, "KittiDepth")

    def _image(self, depth: Path, candidates: list[Path]) -> Path:
        found = _first_file(candidates)
        if found is None:
            raise FileNotFoundError(f"KittiDepth: no image for {depth}; looked for "
                                    f"{', '.join(map(str, candidates))}")
        return found

    def _selection_items(self) -> list[Item]:
        items = []
        for depth in list_images(self.root / "groundtruth_depth"):
            name = depth.name.replace("groundtruth_depth", "image")
            image = self._image(depth, [self.root / "image" / name])
            k_file = (self.root / "intrinsics" / name).with_suffix(".txt")
            K = np.loadtxt(k_file).reshape(3, 3) if k_file.is_file() else None
            items.append((depth, image, K))
        return items

    def _drive_items(self) -> list[Item]:
        depths = sorted(self.root.glob("**/proj_depth/groundtruth/image_0*/*.png"),
                        key=lambda p: (natural_key(p.parents[3]), p.parent.name, natural_key(p)))
        calibs: dict[tuple[Path, str], np.ndarray | None] = {}
        items = []
        for depth in depths:
            cam, drive = depth.parent.name, depth.parents[3]
            date = drive.name[:10]
            bases = [drive] + ([self.image_root / drive.name, self.image_root / date / drive.name]
                               if self.image_root else [])
            image = self._image(depth, [b / cam / "data" / depth.name for b in bases])
            if (drive, cam) not in calibs:
                calibs[drive, cam] = self._calib_K(drive, date, cam)
            items.append((depth, image, calibs[drive, cam]))
        return items

    def _calib_K(self, drive: Path, date: str, cam: str) -> np.ndarray | None:
        places = [drive, drive.parent, self.root]
        if self.image_root:
            places += [self.image_root / date, self.image_root]
        path = _first_file([p / "calib_cam_to_cam.txt" for p in places])
        if path is None:
            return None
        key = f"P_rect_{cam[-2:]}"
        calib = read_calib(path)
        if key not in calib or calib[key].size != 12:
            raise ValueError(f"KittiDepth: {path} has no 3x4 {key}")
        return calib[key].reshape(3, 4)[:, :3]

    def load(self, item: Item) -> Frame:
        depth_path, image_path, K = item
        rgb = read_rgb(image_path)
        intrinsics = None if K is None else Intrinsics.from_matrix(K, rgb.shape[1], rgb.shape[0])
        name = str(depth_path.relative_to(self.root).with_suffix(""))
        return Frame(rgb=rgb, depth=read_depth_png(depth_path, self.depth_scale),
                     intrinsics=intrinsics, name=name)
