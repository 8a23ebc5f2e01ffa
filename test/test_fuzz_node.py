"""`depthkd fuzz-node`, short: a real depth_node process survives a seeded hostile mix."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("rclpy")
pytestmark = pytest.mark.ros

from depthkd_ros.tools.fuzz_node import run_fuzz
from helpers import ros_domain


def test_short_fuzz_run_no_crash_no_drift(tmp_path: Path) -> None:
    figures = run_fuzz(200, seed=1, domain_id=ros_domain(63), log_dir=tmp_path)
    assert figures["crashes"] == 0, figures
    assert figures["drifted"] == 0 and figures["bad_swaps_accepted"] == 0, figures
    for transport, phase in figures["phases"].items():
        assert phase["tracebacks_in_log"] == 0, (transport, phase["node_counters"])
        assert not phase["unaccounted"], (transport, phase["unaccounted"])
        # Every valid frame came back, but under load a camera_info can reach the node more
        # than the pairing wait after its frame: that frame is skipped as unpaired.
        assert all("no camera_info within" in s for s in phase["valid_skipped"]), phase
        assert phase["valid_outputs"] >= 20, (transport, phase)
        assert phase["node_counters"]["dropped_frames"] == "0"
        # A decoded 16000 x 16000 bomb alone is 768 MB; the target is 100 MB over clean.
        assert phase["rss_over_clean_mb"] < 100, (transport, phase["rss_over_clean_mb"])
    raw, compressed = figures["phases"]["raw"], figures["phases"]["compressed"]
    assert raw["by_kind"]["huge_declared"]["skipped"] == raw["by_kind"]["huge_declared"]["sent"]
    assert compressed["by_kind"]["png_bomb"]["skipped"] == compressed["by_kind"]["png_bomb"]["sent"]
    assert int(raw["node_counters"]["camera_info_implausible"]) > 0
