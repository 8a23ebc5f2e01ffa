"""depthkd_core.stamps: the camera_info that belongs to an image's stamp."""

from __future__ import annotations

import pytest

from depthkd_core.stamps import RecentByStamp


def test_nearest_within_tolerance_latest_and_capacity() -> None:
    recent: RecentByStamp[str] = RecentByStamp(capacity=3)
    assert recent.latest() is None and recent.nearest(0, 10**9) is None
    for stamp, name in ((100, "a"), (200, "b"), (300, "c")):
        recent.add(stamp, name)
    assert recent.nearest(205, 10) == "b" and recent.nearest(250, 10) is None
    assert recent.nearest(250, 50) == "c"  # a tie goes to the later one
    assert recent.latest() == "c"
    recent.add(400, "d")  # "a" falls out
    assert recent.nearest(100, 0) is None and recent.nearest(100, 100) == "b"
    with pytest.raises(ValueError):
        RecentByStamp(capacity=0)
