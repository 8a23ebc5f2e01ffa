"""``DepthDataset``: any reader's frames as fixed-size torch tensors for training."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import Dataset

from depthkd_core.data.frame import Frame
from depthkd_core.imaging import resize_rgb, rgb_to_chw


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize with pixel-centre alignment (as ``Intrinsics.scaled``).

    Every output value is one of the input's, so no depth is invented across an
    object edge and labels stay labels.
    """
    h, w = array.shape[:2]
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return array[rows[:, None], cols[None, :]]


def _colour_jitter(image: torch.Tensor, strength: float) -> torch.Tensor:
    """Brightness, contrast and saturation each scaled by U(1 - strength, 1 + strength)."""
    b, c, s = (1 + strength * (2 * torch.rand(3) - 1)).tolist()
    image = image * b
    grey = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]
    image = (image - grey.mean()) * c + grey.mean()
    grey = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]
    image = (image - grey) * s + grey
    return image.clamp(0.0, 1.0)


def _zoomed(frame: Frame, zoom: float, where: list[float]) -> Frame:
    """``frame`` cropped to 1/``zoom`` of its width and height, the window placed at
    fractions ``where`` (x, y) of the room left: what a camera of ``zoom`` times the focal
    length sees (the caller resizes it back up)."""
    fh, fw = frame.rgb.shape[:2]
    ch, cw = max(1, round(fh / zoom)), max(1, round(fw / zoom))
    x0, y0 = int(where[0] * (fw - cw)), int(where[1] * (fh - ch))
    window = (slice(y0, y0 + ch), slice(x0, x0 + cw))
    return replace(
        frame, rgb=frame.rgb[window],
        depth=None if frame.depth is None else frame.depth[window],
        semantic=None if frame.semantic is None else frame.semantic[window],
        instance=None if frame.instance is None else frame.instance[window],
        intrinsics=None if frame.intrinsics is None else frame.intrinsics.cropped(x0, y0, cw, ch))


class DepthDataset(Dataset):
    """Frames of ``reader`` resized to ``height`` x ``width``, as a dict of tensors:

    image (3,H,W) float [0,1]; depth (1,H,W) float metres, 0 invalid (zeros without
    depth); valid (1,H,W) bool; semantic (H,W) int64, -1 without labels;
    intrinsics (4,) float fx fy cx cy for the resized image (zeros when unknown);
    has_depth bool. ``augment``: horizontal flip (cx mirrored), colour jitter of
    strength ``jitter`` and, with ``zoom`` > 1, a zoom by a factor z drawn log-uniformly
    from [1, zoom]: a random window of 1/z of the frame's width and height, at the same
    aspect, resized to the output size (depth and semantics cropped alike, intrinsics
    cropped then scaled). All drawn from torch's RNG, so ``torch.manual_seed`` makes them
    repeatable.
    """

    def __init__(self, reader: Sequence[Frame], height: int, width: int,
                 augment: bool = False, jitter: float = 0.2, zoom: float = 1.0) -> None:
        if height <= 0 or width <= 0:
            raise ValueError(f"DepthDataset size must be positive, got {width}x{height}")
        if len(reader) == 0:
            raise ValueError(f"DepthDataset: reader {type(reader).__name__} has no frames")
        if not 1.0 <= zoom <= 4.0:
            raise ValueError(f"DepthDataset zoom must be in [1, 4], got {zoom}")
        self.reader, self.height, self.width, self.augment = reader, height, width, augment
        self.jitter, self.zoom = jitter, zoom

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        frame = self.reader[index]
        if self.augment and self.zoom > 1.0:
            frame = _zoomed(frame, float(self.zoom ** torch.rand(())), torch.rand(2).tolist())
        h, w = self.height, self.width
        image = torch.from_numpy(rgb_to_chw(resize_rgb(frame.rgb, h, w)))
        has_depth = frame.depth is not None
        depth = (torch.from_numpy(resize_nearest(frame.depth, h, w).copy())[None] if has_depth
                 else torch.zeros(1, h, w))
        semantic = (torch.from_numpy(resize_nearest(frame.semantic, h, w).astype(np.int64))
                    if frame.semantic is not None else torch.full((h, w), -1, dtype=torch.int64))
        K = frame.intrinsics
        intrinsics = (torch.tensor(K.scaled(w, h).as_tuple(), dtype=torch.float32)
                      if K is not None else torch.zeros(4))
        if self.augment:
            if torch.rand(()) < 0.5:
                image, depth, semantic = image.flip(-1), depth.flip(-1), semantic.flip(-1)
                if K is not None:
                    intrinsics[2] = (w - 1) - intrinsics[2]
            image = _colour_jitter(image, self.jitter)
        return {"image": image, "depth": depth, "valid": depth > 0, "semantic": semantic,
                "intrinsics": intrinsics, "has_depth": torch.tensor(has_depth)}
