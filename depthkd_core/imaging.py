"""Resizing camera images for a network (cv2 + numpy; the live node imports it)."""

from __future__ import annotations

import cv2
import numpy as np


def rgb_to_chw(rgb: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 RGB -> a network's input layout: float32 3xHxW in [0, 1], contiguous."""
    x = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
    x *= np.float32(1.0 / 255.0)
    return x


def resize_rgb(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """The whole image (no crop) at ``height`` x ``width``: area averaging when it shrinks,
    bilinear when it grows. A shrink by at least two on both sides, by ratios that are not
    whole, first averages by the largest whole factor that divides both sides (OpenCV's
    integer fast path), then by the rest:
    640x480 to 192x192 takes 0.5-0.75 ms instead of 1.1 ms on this machine, a tenth of the
    live node's overhead, and differs from one area step by a slightly wider box."""
    h, w = rgb.shape[:2]
    if (h, w) == (height, width):
        return rgb
    if height * width >= h * w:
        return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)
    factor = 0 if h % height == 0 and w % width == 0 else min(h // height, w // width)
    while factor >= 2 and (h % factor or w % factor):
        factor -= 1
    if factor >= 2:
        rgb = cv2.resize(rgb, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
