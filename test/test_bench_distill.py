"""`depthkd bench-distill`: refusals (fast) and one tiny real run (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("rclpy")
pytest.importorskip("uvicorn")

from depthkd_core.cli import main

from helpers import FASTDEPTH, ros_domain


def test_refuses_missing_teacher_and_bad_duration(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    assert main(["bench-distill", "--teacher", str(tmp_path / "none.onnx"), "--out",
                 str(out)]) == 1
    assert "teacher not found" in capsys.readouterr().err
    assert main(["bench-distill", "--minutes", "0", "--out", str(out)]) == 1
    assert "--minutes" in capsys.readouterr().err and not out.exists()


@pytest.mark.slow  # ~60 s: a depth_node process, two ONNX exports, fine-tuning rounds
@pytest.mark.needs_shared
def test_tiny_run_reports_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    assert main(["bench-distill", "--teacher", str(FASTDEPTH), "--minutes", "0.3", "--steps", "5",
                 "--min-new", "4", "--out", str(out), "--domain-id", str(ros_domain(62))]) == 0
    report = json.loads(out.read_text())
    assert report["keyframes"] >= 4 and report["keyframes_per_s"] > 0
    assert report["labelled"] >= 4 and report["teacher_rtt_ms"]["mean_ms"] > 0
    assert report["rounds"] >= 1 and report["finetune_steps_per_s"] > 0
    assert report["holdout_abs_rel_before"] > 0 and report["holdout_abs_rel_after"] > 0
    assert "steps/s" in capsys.readouterr().out
