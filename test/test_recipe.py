"""`depthkd make-student` end to end on a tiny FastDepth teacher, and `depthkd bench-real`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from helpers import TINY_FASTDEPTH, save_tiny_fastdepth_onnx, write_linear_onnx

from depthkd_core.cli import main
from depthkd_core.models import ModelConfig, build_model, load_checkpoint, load_teacher
from depthkd_core.bench.cache import file_sha256 as sha256
from depthkd_core.models.interpolate import interpolate_weights
from depthkd_core.recipe import StudentRecipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder with the project's config/ and a tiny FastDepth teacher."""
    root = tmp_path_factory.mktemp("recipe")
    shutil.copytree(ROOT / "config", root / "config")
    save_tiny_fastdepth_onnx(root / "teacher.onnx", size=(64, 64))
    widths = [f"model.{k}=[{','.join(map(str, v))}]" for k, v in TINY_FASTDEPTH.items()]
    recipe = {"teacher": "teacher.onnx", "distill": "config/distill/fastdepth_student.yaml",
              "overrides": [*widths, "max_steps=3", "ckpt_every=2", "log_every=1",
                            "model.input_size=[32,32]", "data.height=64", "data.width=64",
                            "optim.batch_size=2"],
              "init_from_teacher": True, "sim_frames": 6, "sim_workers": 1, "sim_height": 64,
              "sim_width": 64, "val_frames": 3, "export_height": 32, "export_width": 32,
              "judge_styles": ["indoor"],
              "out_dir": "runs/student/tiny"}
    (root / "tiny.yaml").write_text(json.dumps(recipe))
    return root


def test_make_student_end_to_end(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(workdir)
    assert main(["make-student", "--config", "tiny.yaml", "--install", "installed"]) == 0
    out = workdir / "runs" / "student" / "tiny"
    provenance = json.loads((workdir / "installed" / "student.json").read_text())
    assert provenance["teacher"]["sha256"] == sha256(workdir / "teacher.onnx")
    assert provenance["method"] == "kd_ood" and provenance["steps"] == 3
    assert provenance["data"] == {"kind": "simulated only", "style": "target", "frames": 6, "seed": 1,
                                  "size": [64, 64]}
    assert provenance["command"].startswith("depthkd make-student --config tiny.yaml")
    assert provenance["checkpoint"] == "student.pt"
    assert provenance["student"]["onnx_sha256"] == sha256(workdir / "installed" / "student.onnx")
    held_out = provenance["held_out_sim"]
    assert held_out["frames"] == 3 and 0.0 <= held_out["agree_delta1"] <= 1.0
    other = provenance["held_out_by_style"]["indoor"]  # a look it was not trained on
    assert other["frames"] == 3 and 0.0 <= other["agree_delta1"] <= 1.0
    assert json.loads((workdir / "runs" / "data" / "indoor_s1000_n3_64x64" / "meta.json").read_text()
                      )["style"] == "indoor"
    for name in ("student.onnx", "student.pt", "student.json"):
        assert (workdir / "installed" / name).read_bytes() == (out / name).read_bytes()
    # the ONNX runs at the export size; the checkpoint is the trained student (step 3)
    student = load_teacher(workdir / "installed" / "student.onnx")
    assert student.input_size == (32, 32)
    model, cfg, extra = load_checkpoint(workdir / "installed" / "student.pt")
    assert cfg.name == "fastdepth" and extra["step"] == 3
    x = torch.rand(1, 3, 32, 32)
    assert np.abs(student(x).numpy() - model.eval()(x).detach().numpy()).max() < 1e-4
    # started from the teacher: before training, student == teacher at the teacher's size
    untrained = workdir / "runs" / "student" / "untrained"
    assert main(["make-student", "--config", "tiny.yaml", "train=false",
                 f"out_dir={untrained}"]) == 0
    initial, _, _ = load_checkpoint(untrained / "student.pt")
    imported = build_model(ModelConfig(name="fastdepth", pretrained=str(workdir / "teacher.onnx"),
                                       **TINY_FASTDEPTH))
    assert all(torch.equal(a, b) for a, b in zip(initial.state_dict().values(),
                                                 imported.state_dict().values()))
    assert not torch.equal(model.out.weight, initial.out.weight)  # training moved it
    assert json.loads((untrained / "student.json").read_text())["steps"] == 0


def test_interpolate_weights_is_the_line_between_two_networks() -> None:
    start = build_model(ModelConfig(name="fastdepth", **TINY_FASTDEPTH))
    torch.manual_seed(1)
    tuned = build_model(ModelConfig(name="fastdepth", **TINY_FASTDEPTH))
    for alpha, expect in ((0.0, start), (1.0, tuned)):
        got = interpolate_weights(start, tuned, alpha)
        assert all(torch.equal(got[k], v) for k, v in expect.state_dict().items())
    half = interpolate_weights(start, tuned, 0.5)
    assert not any(v.isnan().any() for v in half.values() if v.is_floating_point())  # inf caps
    torch.testing.assert_close(half["out.weight"], (start.out.weight + tuned.out.weight) / 2)
    with pytest.raises(ValueError, match="different shapes"):
        interpolate_weights(start, build_model(ModelConfig(name="fastdepth", **TINY_FASTDEPTH,
                                                           decoder_stages=2)), 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interpolate_weights(start, tuned, 1.5)


def test_the_recipe_ships_the_interpolated_student_its_held_out_frames_prefer(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    out = workdir / "runs" / "student" / "tiny_wise"
    assert main(["make-student", "--config", "tiny.yaml", "weight_interpolation=[0.5]",
                 f"out_dir={out}"]) == 0
    provenance = json.loads((out / "student.json").read_text())
    blend = provenance["weight_interpolation"]
    means = {alpha: figures["mean"] for alpha, figures in blend["agree_delta1"].items()}
    assert sorted(means) == ["0.5", "1"] and blend["judged_on"] == ["indoor"]
    assert blend["chosen"] == float(max(means, key=means.get))
    start = build_model(ModelConfig(name="fastdepth", pretrained=str(workdir / "teacher.onnx"),
                                    input_size=(32, 32), **TINY_FASTDEPTH))
    distilled, _, _ = load_checkpoint(out / "distill" / "final.pt")
    shipped, _, extra = load_checkpoint(out / "student.pt")
    assert extra["interpolation_alpha"] == blend["chosen"] and extra["step"] == 3
    expected = interpolate_weights(start, distilled, blend["chosen"])
    assert all(torch.allclose(v, expected[k]) for k, v in shipped.state_dict().items())
    # the ONNX is the shipped checkpoint; the figures judged it as it ships
    x = torch.rand(1, 3, 32, 32)
    onnx = load_teacher(out / "student.onnx")
    assert np.abs(onnx(x).numpy() - shipped.eval()(x).detach().numpy()).max() < 1e-4
    assert provenance["held_out_by_style"]["indoor"]["agree_delta1"] == pytest.approx(
        means[f"{blend['chosen']:g}"], abs=1e-6)
    with pytest.raises(ValueError, match="init_from_teacher"):
        StudentRecipe(teacher="t", distill="d", weight_interpolation=[0.5])
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        StudentRecipe(teacher="t", distill="d", init_from_teacher=True, weight_interpolation=[1.0])


def test_the_recipe_ships_an_int8_student_calibrated_on_transfer_frames(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    out = workdir / "runs" / "student" / "tiny_int8"
    (workdir / "int8_installed").mkdir()
    assert main(["make-student", "--config", "tiny.yaml", "quantize=int8", "quant_frames=4",
                 "weight_interpolation=[0.5]", f"out_dir={out}", "--install", "int8_installed"]) == 0
    installed = sorted(p.name for p in (workdir / "int8_installed").iterdir())
    assert installed == ["student.json", "student.onnx", "student.pt", "student_fp32.onnx"]
    provenance = json.loads((out / "student.json").read_text())
    quant = provenance["student"]["quantization"]
    assert quant["calibration"] == "4 transfer frames, min/max"
    assert quant["fp32_onnx_sha256"] == sha256(out / "student_fp32.onnx")
    assert quant["vs_fp32"]["images"] == 3 and quant["vs_fp32"]["agree_delta1"] >= 0.95
    ops = {node.op_type for node in onnx.load(str(out / "student.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # the fp32 graph is the shipped checkpoint; the int8 one is close to it
    shipped, _, _ = load_checkpoint(out / "student.pt")
    x = torch.rand(1, 3, 32, 32)
    reference = shipped.eval()(x).detach().numpy()
    assert np.abs(load_teacher(out / "student_fp32.onnx")(x).numpy() - reference).max() < 1e-4
    assert np.abs(load_teacher(out / "student.onnx")(x).numpy() - reference).max() < 0.1 * reference.max()
    # every interpolation candidate was judged as it ships: quantised
    for alpha in ("0.500", "1.000"):
        ops = {n.op_type for n in onnx.load(str(out / "interpolation" / f"alpha_{alpha}.onnx")).graph.node}
        assert "QuantizeLinear" in ops
    assert main(["make-student", "--config", "tiny.yaml", "--install", "int8_installed"]) == 0
    assert not (workdir / "int8_installed" / "student_fp32.onnx").exists()  # none left behind
    with pytest.raises(ValueError, match="quantize must be one of"):
        StudentRecipe(teacher="t", distill="d", quantize="int4")
    with pytest.raises(ValueError, match="quant_frames"):
        StudentRecipe(teacher="t", distill="d", quant_frames=0)


def _write_nyu_frames(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        cv2.imwrite(str(root / f"rgb_{i:05d}.png"), rng.integers(0, 255, (48, 64, 3), np.uint8))
        depth = rng.uniform(500, 4000, (48, 64)).astype(np.uint16)
        cv2.imwrite(str(root / f"depth_{i:05d}.png"), depth)
    return root


def test_bench_real_judges_against_truth_and_teacher(workdir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(workdir)
    frames = _write_nyu_frames(tmp_path / "frames", 2)
    other = write_linear_onnx(tmp_path / "other.onnx", scale=3.0, offset=0.5, size=(32, 32))
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png", "skipped.png"):
        cv2.imwrite(str(photos / name), np.random.default_rng(1).integers(0, 255, (40, 60, 3), np.uint8))
    config = {"teacher": "teacher.onnx", "height": 48, "width": 64, "latency_runs": 2, "latency_rounds": 3,
              "sets": [{"name": "synthetic", "reader": "nyu_png", "root": str(frames)},
                       {"name": "unlabelled", "reader": "images", "root": str(photos),
                        "reader_kwargs": {"names": ["b.png", "a.png"]}},
                       {"name": "absent", "reader": "images", "root": str(tmp_path / "no"),
                        "optional": True}],
              "rows": [{"name": "self", "model": "teacher.onnx"},
                       {"name": "other", "model": str(other)},
                       {"name": "missing", "model": "nothing.onnx"}]}
    (tmp_path / "real.yaml").write_text(json.dumps(config))
    assert main(["bench-real", "--config", str(tmp_path / "real.yaml"), "--out", str(tmp_path / "o")]) == 1
    assert main(["bench-real", "--config", str(tmp_path / "real.yaml"), "--out", str(tmp_path / "o"),
                 "--rows", "self,other"]) == 0
    written = json.loads((tmp_path / "o" / "real.json").read_text())
    assert [s["name"] for s in written["meta"]["sets"]] == ["synthetic", "unlabelled"]
    assert "optional set 'absent' left out" in capsys.readouterr().err
    # photos without depth are judged by agreement alone
    unlabelled = {r["model"]: r for r in written["rows"] if r["set"] == "unlabelled"}
    assert unlabelled["self"]["frames"] == 2 and unlabelled["self"]["agree_delta1"] == 1.0
    assert unlabelled["other"]["agree_delta1"] < 1.0
    assert not any(key.startswith("gt_") for key in unlabelled["other"])
    rows = {r["model"]: r for r in written["rows"] if r["set"] == "synthetic"}
    assert rows["self"]["agree_delta1"] == 1.0 and rows["self"]["agree_abs_rel"] == 0.0
    assert rows["other"]["agree_delta1_min"] <= rows["other"]["agree_delta1"] < 1.0
    assert rows["other"]["input"] == "32x32" and rows["self"]["frames"] == 2
    assert 0 < rows["other"]["gt_abs_rel"]
    assert 0 < rows["other"]["latency_vs_teacher"] <= rows["other"]["latency_vs_teacher_q75"]
    [run] = written["meta"]["runs"]
    assert run["latency_pairs"] == 3 and run["rows"] == ["self", "other"] and run["teacher_latency_ms"] > 0
    assert "agree_delta1_min" in (tmp_path / "o" / "real.md").read_text()

    # --update measures one row again and merges it: the other row and its run stay as they were
    before = {(r["model"], r["set"]): r for r in written["rows"]}
    assert main(["bench-real", "--config", str(tmp_path / "real.yaml"), "--out", str(tmp_path / "o"),
                 "--rows", "other", "--update"]) == 0
    merged = json.loads((tmp_path / "o" / "real.json").read_text())
    assert [(r["model"], r["set"]) for r in merged["rows"]] == list(before)   # same rows, same order
    assert all(r == before[(r["model"], r["set"])] for r in merged["rows"] if r["model"] == "self")
    assert [run["rows"] for run in merged["meta"]["runs"]] == [["self"], ["other"]]
    table = (tmp_path / "o" / "real.md").read_text()
    assert "pairs): self; " in table and "pairs): other." in table
    # a table of other frame sets does not merge: its figures would not compare
    config["sets"] = config["sets"][:1]
    (tmp_path / "real.yaml").write_text(json.dumps(config))
    assert main(["bench-real", "--config", str(tmp_path / "real.yaml"), "--out", str(tmp_path / "o"),
                 "--rows", "other", "--update"]) == 1
    assert "another sets" in capsys.readouterr().err
    assert json.loads((tmp_path / "o" / "real.json").read_text()) == merged


def test_a_table_written_before_runs_were_recorded_merges_as_one_run() -> None:
    from depthkd_core.bench.real import merge_tables, render

    sets = [{"name": "tum"}]
    old = {"meta": {"date": "2026-12-02", "teacher": "t.onnx", "teacher_latency_ms": 27.4,
                    "latency_pairs": 15, "sets": sets},
           "rows": [{"model": m, "set": "tum", "agree_delta1": d} for m, d in (("a", 0.5), ("b", 0.6))]}
    run = {"date": "2026-12-03 10:00 UTC", "teacher_latency_ms": 20.0, "latency_pairs": 15, "rows": ["b", "c"]}
    rows, meta = merge_tables(old, [{"model": m, "set": "tum", "agree_delta1": 0.9} for m in ("c", "b")],
                              {"teacher": "t.onnx", "sets": sets, "runs": [run]})
    assert [(r["model"], r["agree_delta1"]) for r in rows] == [("a", 0.5), ("b", 0.9), ("c", 0.9)]
    assert meta["runs"][0] == {"date": "2026-12-02", "teacher_latency_ms": 27.4, "latency_pairs": 15,
                               "rows": ["a"]}
    assert "2026-12-02 (teacher 27.4 ms, 15 pairs): a; 2026-12-03 10:00 UTC (teacher 20.0 ms" in render(rows, meta)


def test_bench_real_makes_missing_rows_on_every_core_and_times_on_one(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`make bench-real` trains the missing rows' recipes (an hour each) with all torch threads;
    only the latency table is measured on one, and the caller's setting comes back after."""
    from depthkd_core.bench import real

    seen: dict[str, int] = {}
    monkeypatch.setattr(real, "make_missing", lambda rows: seen.setdefault("make", torch.get_num_threads()))
    monkeypatch.setattr(real, "run_real_bench",
                        lambda cfg, out, update: seen.setdefault("bench", torch.get_num_threads()))
    config = {"teacher": "t.onnx", "rows": [{"name": "a", "model": "a.onnx"}]}
    (tmp_path / "real.yaml").write_text(json.dumps(config))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["bench-real", "--config", str(tmp_path / "real.yaml"), "--out", str(tmp_path / "o"),
                     "--make"]) == 0
        assert seen == {"make": 2, "bench": 1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_every_shipped_recipe_and_bench_row_resolves(monkeypatch):
    """Each config/student recipe, and each bench-real row's recipe with its overrides, loads
    and names a distill config that loads with the recipe's overrides: a renamed file or a
    stale override fails here, not an hour into `make bench-real --make`."""
    from depthkd_core.bench.real import RealBenchConfig
    from depthkd_core.config import load_config
    from depthkd_core.methods.config import load_distill_config
    from depthkd_core.recipe import StudentRecipe

    monkeypatch.chdir(ROOT)
    bench = load_config(RealBenchConfig, "config/bench/real.yaml", [])
    made = [(row.recipe, row.overrides) for row in bench.rows if row.recipe is not None]
    made += [(str(p.relative_to(ROOT)), []) for p in sorted((ROOT / "config" / "student").glob("*.yaml"))]
    for path, overrides in made:
        recipe = load_config(StudentRecipe, path, overrides)
        cfg = load_distill_config(recipe.distill, recipe.overrides)
        if recipe.init_from_teacher and cfg.model.input_size is not None:
            # the network's input is the exported ONNX's (the live node's model input)
            assert tuple(cfg.model.input_size) == (recipe.export_height, recipe.export_width), path
    rows = [r for r in bench.rows if r.recipe is not None]
    # every recipe row writes where its model is read from, and no two rows share a folder
    for row in rows:
        recipe = load_config(StudentRecipe, row.recipe, row.overrides)
        assert Path(row.model).parent == Path(recipe.out_dir), row.name
    assert len({load_config(StudentRecipe, r.recipe, r.overrides).out_dir for r in rows}) == len(rows)


def test_every_distill_config_loads_with_its_method_options():
    from depthkd_core.config import from_dict
    from depthkd_core.methods import METHODS
    from depthkd_core.methods.config import load_distill_config

    for path in sorted((ROOT / "config" / "distill").glob("*.yaml")):
        cfg = load_distill_config(path)
        from_dict(METHODS.get(cfg.method).Config, cfg.method_kwargs, f"{path.name} method_kwargs")
