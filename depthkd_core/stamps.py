"""Pairing messages by time stamp (ROS-free): which camera_info belongs to an image.

Camera drivers publish an image and its camera_info with the same stamp, on two topics
that arrive in either order. ``RecentByStamp`` keeps the last few items by stamp and
answers the one nearest a given stamp within a tolerance (what image_pipeline's
approximate-time pairing does), or the newest one for drivers whose stamps disagree.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class RecentByStamp(Generic[T]):
    """The last ``capacity`` items with their stamps (integer nanoseconds)."""

    def __init__(self, capacity: int = 16) -> None:
        if capacity < 1:
            raise ValueError(f"RecentByStamp capacity must be >= 1, got {capacity}")
        self._items: deque[tuple[int, T]] = deque(maxlen=capacity)

    def add(self, stamp_ns: int, item: T) -> None:
        self._items.append((stamp_ns, item))

    def latest(self) -> T | None:
        return self._items[-1][1] if self._items else None

    def nearest(self, stamp_ns: int, tolerance_ns: int) -> T | None:
        """The item whose stamp is closest to ``stamp_ns``, if within ``tolerance_ns``
        (the later one on a tie: a driver re-sending info keeps the last word)."""
        best = None
        for stamp, item in self._items:
            gap = abs(stamp - stamp_ns)
            if gap <= tolerance_ns and (best is None or gap <= best[0]):
                best = (gap, item)
        return best[1] if best is not None else None
