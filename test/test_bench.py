"""`depthkd bench`: the whole pipeline on a micro preset, its cache, the table, the checks."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import yaml

from depthkd_core.bench.preset import BenchPreset, load_preset
from depthkd_core.bench.run import check_mac_ratio, distill_config, run_bench, supervised_config
from depthkd_core.bench.table import COLUMNS, check_claim, recovery_ratio
from depthkd_core.cli import main as cli_main
from depthkd_core.config import from_dict
from depthkd_core.models import ModelConfig

TINY_STUDENT = ["model.encoder=mobilenetv2_050", "model.decoder_channels=[32, 16, 16, 8]",
                "ckpt_every=0", "data.num_workers=0", "log_every=1", "optim.batch_size=4"]
MICRO = {
    "data": {"target_train": 8, "target_test": 4, "sim": 8, "height": 64, "width": 64},
    "teacher": {"base": "config/train/teacher_resnet50.yaml",
                "overrides": ["model.encoder=resnet18", "max_steps=2", "ckpt_every=0",
                              "data.num_workers=0", "optim.batch_size=4"]},
    "student": {"base": "config/train/student_mbv2.yaml", "overrides": TINY_STUDENT + ["max_steps=2"]},
    "distill": {"max_steps": 2, "batch_size": 4, "overrides": ["ckpt_every=0"]},
    "rows": ["noise", "kd_ood"],
    "eval": {"batch_size": 4, "latency_runs": 1},
    "transform": {"batch_size": 4, "g_steps": 1, "max_iterations": 2},
}


def test_recovery_ratio_hand_values() -> None:
    # (0.70 - 0.40) / (0.90 - 0.40) = 0.6; the references map to 0 and 1
    assert recovery_ratio(0.70, 0.40, 0.90) == pytest.approx(0.6)
    assert recovery_ratio(0.40, 0.40, 0.90) == 0.0
    assert recovery_ratio(0.90, 0.40, 0.90) == pytest.approx(1.0)
    assert math.isnan(recovery_ratio(0.5, 0.4, 0.4))


def test_claim_ordering_computed() -> None:
    results = {"noise": {"abs_rel": 0.5}, "dfad": {"abs_rel": 0.3}, "kd_ood": {"abs_rel": 0.35},
               "datafree": {"abs_rel": 0.16}, "student": {"abs_rel": 0.14},
               "datafree_no_g": {"abs_rel": 0.20}}
    claim = check_claim(results)
    assert [p["held"] for p in claim["pairs"]] == [True, False, True, True]
    assert claim["held"] is False and claim["held_count"] == 3
    assert claim["pairs"][1]["margin"] == pytest.approx(-0.05)
    assert claim["ablation_vs_datafree"] == {"datafree_no_g": pytest.approx(0.04)}
    assert check_claim({"noise": {"abs_rel": 0.5}})["held"] is None
    # rows missing from the chain are skipped: noise is compared with kd_ood directly
    partial = check_claim({"noise": {"abs_rel": 0.5}, "kd_ood": {"abs_rel": 0.3}})
    assert [(p["worse"], p["better"], p["held"]) for p in partial["pairs"]] == [("noise", "kd_ood", True)]


def test_presets_load() -> None:
    for name in ("quick", "full"):
        preset = load_preset(name)
        assert len(preset.rows) == 8 and preset.min_mac_ratio >= 10
        # every row's config resolves, and the teacher passes the MACs check the run starts with
        cfgs = {w: supervised_config(preset, w, Path("target")) for w in ("teacher", "student")}
        for row in preset.rows:
            cfg = distill_config(preset, row, cfgs["student"].model, Path("t.pt"), Path("sim"))
            assert cfg.model == cfgs["student"].model and cfg.max_steps == preset.distill.max_steps
        size = (preset.data.height, preset.data.width)
        assert check_mac_ratio(cfgs["teacher"].model, cfgs["student"].model, size, 10.0) >= 10
    # full: 0.5 epochs of 2000 sim frames at batch 8 = 125 steps between halvings
    assert cfg.optim.step_size == 125
    with pytest.raises(ValueError, match="unknown bench preset"):
        load_preset("nope")
    with pytest.raises(FileNotFoundError, match="not_a_method"):
        from_dict(BenchPreset, {**MICRO, "rows": ["not_a_method"]})


def test_small_teacher_fails_loudly(tmp_path: Path) -> None:
    student = ModelConfig(name="student", encoder="mobilenetv2_050")
    with pytest.raises(ValueError, match=r"only 1\.0x .*needs >= 10x"):
        check_mac_ratio(student, student, (64, 64), 10.0)
    preset = from_dict(BenchPreset, {**MICRO, "teacher": {
        "base": "config/train/student_mbv2.yaml", "overrides": TINY_STUDENT}})
    with pytest.raises(ValueError, match="the benchmark needs >= 10x"):
        run_bench(preset, tmp_path)
    assert not (tmp_path / "runs").exists()  # refused before any training


def _mtimes(out: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in (out / "runs").glob("*/final.pt")}


def test_micro_pipeline_and_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "micro.yaml").write_text(yaml.safe_dump(MICRO))
    out = tmp_path / "out"
    assert cli_main(["bench", "--preset", str(tmp_path / "micro.yaml"), "--out", str(out),
                     "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["row"] for r in report["rows"]] == ["teacher", "student", "noise", "kd_ood"]
    assert all(list(r) == list(COLUMNS) for r in report["rows"][1:])
    assert list(report["rows"][0]) == [c for c in COLUMNS if c != "recovery"]  # the teacher
    assert report["trained"] == ["teacher", "student", "noise", "kd_ood"]
    by_row = {r["row"]: r for r in report["rows"]}
    assert by_row["noise"]["recovery"] == 0.0 and by_row["student"]["recovery"] == 1.0
    assert report["mac_ratio"] >= 10 and report["transform"]["g_steps"] == 1
    md = (out / "report.md").read_text()
    assert "| teacher |" in md and "| kd_ood |" in md and "Ordering here:" in md
    held = report["claim"]["pairs"][0]
    assert held["held"] == (by_row["noise"]["abs_rel"] > by_row["kd_ood"]["abs_rel"])
    assert "bench-transform" in md
    before = _mtimes(out)
    assert len(before) == 4

    preset = from_dict(BenchPreset, MICRO)
    with caplog.at_level(logging.INFO, logger="depthkd_core.bench"):
        again = run_bench(preset, out, progress=False)
    assert again.trained == [] and _mtimes(out) == before
    assert "cache hit: teacher" in caplog.text and "eval:kd_ood" in again.cache_hits
    assert [r["abs_rel"] for r in again.rows] == [r["abs_rel"] for r in report["rows"]]

    forced = run_bench(preset, out, force=["kd_ood"], progress=False)
    assert forced.trained == ["kd_ood"]
    with pytest.raises(ValueError, match="unknown row"):
        run_bench(preset, out, force=["dfad"])
