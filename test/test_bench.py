"""`depthkd bench`: the whole pipeline on a micro preset, its cache, the table, the checks."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import yaml

from depthkd_core.bench.preset import BenchPreset, load_preset
from depthkd_core.bench.preset import resolve_config
from depthkd_core.bench.relative import RELATIVE_OUTPUT, RelativeDisparity, export_relative_teacher
from depthkd_core.bench.run import (check_mac_ratio, distill_config, run_bench, section_config,
                                    supervised_config)
from depthkd_core.bench.table import COLUMNS, check_claim, check_pairs, recovery_ratio
from depthkd_core.methods.config import load_distill_config
from depthkd_core.models import build_model, load_teacher, save_checkpoint
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
        # every row's config resolves, and each teacher passes the MACs check the run starts with
        teachers = ["teacher", *preset.teachers]
        cfgs = {w: supervised_config(preset, w, Path("target")) for w in teachers + ["student"]}
        student = cfgs["student"].model
        for row in preset.rows:
            cfg = distill_config(preset, row, student, Path("t.pt"), Path("sim"))
            assert cfg.model == student and cfg.max_steps == preset.distill.max_steps
        size = (preset.data.height, preset.data.width)
        for w in teachers:
            assert check_mac_ratio(cfgs[w].model, student, size, 10.0) >= 10
        roots = {"sim": Path("sim"), "target_train": Path("target")}
        for row in preset.section_rows():
            section = section_config(preset, row, student, Path("t.onnx"), roots)
            own = load_distill_config(resolve_config(f"config/distill/{row.config}.yaml"))
            # the bench student's body with the row's own head (dpm, bins, LG-Conv)
            assert section.model.encoder == student.encoder and section.model.head == own.model.head
            assert section.model.lgconv_stages == own.model.lgconv_stages
            assert section.teacher_output == ("relative_inverse" if row.relative_teacher else "auto")
            if own.data.reader == "images":
                assert section.data.root == str(Path("target") / "rgb")
    full = load_preset("full")
    assert {r.teacher for r in full.section_rows()} == {"teacher", "swin"}
    assert [len(s.rows) for s in full.sections] == [5, 3, 5]
    # a row's own overrides come after the preset's (the lambda_kd probe of the DisDepth table)
    (probe,) = [r for r in full.section_rows() if r.overrides]
    cfg = section_config(full, probe, student, Path("t.pt"), {"target_train": Path("target")})
    assert cfg.method_kwargs["lambda_kd"] == pytest.approx(2.5e-4) and cfg.optim.lr == 1e-3
    # full: 0.5 epochs of 1200 sim frames at batch 8 = 75 steps between halvings
    assert distill_config(full, "noise", student, Path("t.pt"), Path("sim")).optim.step_size == 75
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
    assert [r["row"] for r in report["rows"]] == ["constant", "teacher", "student", "noise", "kd_ood"]
    assert all(list(r) == list(COLUMNS) for r in report["rows"][2:])
    # the constant reference and the teacher have no recovery; the constant costs nothing
    assert [list(r) for r in report["rows"][:2]] == [[c for c in COLUMNS if c not in ("recovery", "latency_ms")],
                                                     [c for c in COLUMNS if c != "recovery"]]
    assert report["rows"][0]["params_M"] == 0 and report["rows"][0]["steps"] == 0
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
    with pytest.raises(ValueError, match="unknown stage"):
        run_bench(preset, out, force=["dfad"])


SECTION = {"title": "micro section", "claim": "tiekd beats MSE",
           "rows": [{"name": "kd_mse_t", "config": "tiekd_kd_mse"},
                    {"name": "tiekd_t", "config": "tiekd"},
                    {"name": "lf_rel", "config": "labelfree_mse", "relative_teacher": True}],
           "pairs": [["kd_mse_t", "tiekd_t"], ["relative:teacher", "lf_rel"]]}


def test_sections_rows_filter_and_relative_teacher(tmp_path: Path) -> None:
    preset = from_dict(BenchPreset, {**MICRO, "rows": ["noise"], "transform": None,
                                     "sections": [SECTION]})
    # --rows: only what is named, and the teacher those rows need (no student, no noise)
    part = run_bench(preset, tmp_path, progress=False, only=["tiekd_t"])
    assert part.trained == ["teacher", "tiekd_t"]
    whole = run_bench(preset, tmp_path, progress=False)
    assert whole.trained == ["student", "noise", "kd_mse_t", "relative:teacher", "lf_rel"]
    (section,) = whole.sections
    assert [r["row"] for r in section["rows"]] == ["teacher", "relative:teacher", "kd_mse_t",
                                                     "tiekd_t", "lf_rel"]
    by_row = {r["row"]: r for r in section["rows"]}
    assert by_row["lf_rel"]["alignment"] == "lsq" and by_row["relative:teacher"]["alignment"] == "lsq"
    assert by_row["tiekd_t"]["alignment"] == "none"
    assert [(p["worse"], p["better"]) for p in section["pairs"]] == [("kd_mse_t", "tiekd_t"),
                                                                     ("relative:teacher", "lf_rel")]
    # the relative teacher's lsq-aligned accuracy is the metric teacher's shape: close to it
    assert by_row["relative:teacher"]["abs_rel"] < 2 * by_row["teacher"]["abs_rel"] + 0.1
    md = whole.report_md.read_text()
    assert "## micro section" in md and "Paper: tiekd beats MSE" in md and "| lf_rel |" in md
    report = json.loads(whole.report_json.read_text())
    assert [r["row"] for r in report["rows"]] == ["constant", "teacher", "student", "noise"]
    with pytest.raises(ValueError, match="unknown stage"):
        run_bench(preset, tmp_path, only=["nope"])


def test_preset_section_validation() -> None:
    bad_teacher = {**SECTION, "rows": [{"name": "x", "config": "tiekd", "teacher": "vit"}], "pairs": []}
    with pytest.raises(ValueError, match="unknown teacher 'vit'"):
        from_dict(BenchPreset, {**MICRO, "sections": [bad_teacher]})
    with pytest.raises(ValueError, match="pair .* must name two of"):
        from_dict(BenchPreset, {**MICRO, "sections": [{**SECTION, "pairs": [["kd_mse_t", "zz"]]}]})
    with pytest.raises(ValueError, match="distinct names"):
        from_dict(BenchPreset, {**MICRO, "sections": [{**SECTION, "rows": SECTION["rows"][:1] * 2,
                                                        "pairs": []}]})
    with pytest.raises(ValueError, match="data must be one of"):
        from_dict(BenchPreset, {**MICRO, "sections": [{**SECTION, "pairs": [], "rows": [
            {"name": "x", "config": "tiekd", "data": "target_test"}]}]})


def test_sections_file(tmp_path: Path) -> None:
    listed = tmp_path / "sections.yaml"
    listed.write_text(yaml.safe_dump([SECTION]))
    preset = from_dict(BenchPreset, {**MICRO, "sections_file": str(listed)})
    assert [s.title for s in preset.sections] == ["micro section"]
    listed.write_text(yaml.safe_dump(SECTION))
    with pytest.raises(ValueError, match="must be a YAML list of sections"):
        from_dict(BenchPreset, {**MICRO, "sections_file": str(listed)})


def test_check_pairs() -> None:
    results = {"a": {"abs_rel": 0.3}, "b": {"abs_rel": 0.2}}
    (pair,) = check_pairs([["a", "b"], ["b", "missing"]], results)
    assert pair["held"] and pair["margin"] == pytest.approx(0.1)
    assert not check_pairs([["b", "a"]], results)[0]["held"]


def test_relative_disparity_teacher(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(encoder="mobilenetv2_050", decoder_channels=(32, 16, 16, 8))
    model = build_model(cfg).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        depth, rel = model(x), RelativeDisparity(model)(x)
    flat = rel.flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(1), torch.ones(2), atol=1e-4, rtol=0)
    # an affine map of 1/depth with a positive scale: farther pixels get smaller values
    order = depth.flatten(1).argsort(1)
    assert bool((flat.gather(1, order).diff(dim=1) <= 1e-5).all())
    ckpt = save_checkpoint(tmp_path / "t.pt", model, cfg)
    report = export_relative_teacher(ckpt, tmp_path / "rel.onnx", 64, 64)
    assert report.passed
    teacher = load_teacher(tmp_path / "rel.onnx", output=RELATIVE_OUTPUT)
    assert teacher.is_inverse and not teacher.is_metric
    torch.testing.assert_close(teacher(x), rel, atol=1e-4, rtol=1e-4)


def test_constant_reference_is_the_median_train_depth(tmp_path: Path) -> None:
    from depthkd_core.bench.run import evaluate_constant
    from depthkd_core.data.simulator import write_dataset

    train = write_dataset(tmp_path / "train", "target", n=3, height=64, width=64, seed=0)
    test = write_dataset(tmp_path / "test", "target", n=2, height=64, width=64, seed=1)
    preset = from_dict(BenchPreset, MICRO)
    result = evaluate_constant(Path(train), Path(test), preset)
    from depthkd_core.data import DepthDataset, build_reader

    frames = DepthDataset(build_reader("sim", train), 64, 64)
    depths = torch.cat([f["depth"][f["valid"]] for f in (frames[i] for i in range(3))])
    assert result["depth_m"] == pytest.approx(float(depths.median()))
    assert result["count"] == 2 and 0 < result["abs_rel"] < 1 and result["params_M"] == 0

