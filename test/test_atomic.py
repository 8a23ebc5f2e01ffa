"""atomic_open: the target is replaced whole on success and untouched on failure."""

from __future__ import annotations

import pytest

from depthkd_core.atomic import TMP_SUFFIX, atomic_open


def test_success_replaces_the_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    with atomic_open(target, "w") as f:
        f.write("new")
        assert target.read_text() == "old"  # readers see the old file until the end
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_failure_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_open(target) as f:
            f.write(b"half")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"good"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(TMP_SUFFIX)]
