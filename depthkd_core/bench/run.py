"""`depthkd bench --preset quick|full`: Table II of Hu et al. (*Data-free Dense Depth
Distillation*) on the project's own domains, end to end (docs/benchmark.md).

1. render the ``target`` domain (train + test) and the ``sim`` domain (semantic maps);
2. train a teacher (>= ``min_mac_ratio`` x the student's MACs) and a supervised student
   on target train;
3. distil the student from the teacher on ``sim`` images only, one row per
   config/distill/<row>.yaml;
4. evaluate every model on target test; write report.md + report.json, with the
   recovery ratio, the paper's AbsRel ordering tested, and `bench-transform`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from depthkd_core.bench.cache import BenchCache, file_hash
from depthkd_core.bench.preset import BenchPreset, load_preset, resolve_config
from depthkd_core.bench.table import build_rows, check_claim, render_report
from depthkd_core.data import DepthDataset, build_reader
from depthkd_core.evaluate.profile import count_macs
from depthkd_core.evaluate.report import evaluate_model, model_cost
from depthkd_core.methods.config import DistillConfig, load_distill_config
from depthkd_core.methods.deepinversion import bench_transform, format_report
from depthkd_core.methods.engine import distill
from depthkd_core.models import ModelConfig, build_model, load_teacher
from depthkd_core.train.config import TrainConfig, load_train_config
from depthkd_core.train.supervised import train_supervised

log = logging.getLogger(__name__)

SPLITS = {"target_train": ("target", 0), "target_test": ("target", 1), "sim": ("sim", 2)}


@dataclass
class BenchResult:
    """rows: the table; claim: ``check_claim``; trained / cache_hits: what this run did."""

    rows: list[dict[str, Any]]
    claim: dict[str, Any]
    transform: dict[str, Any] | None
    mac_ratio: float
    trained: list[str]
    cache_hits: list[str]
    report_md: Path
    report_json: Path
    seconds: float


def check_mac_ratio(teacher: ModelConfig, student: ModelConfig, size: tuple[int, int],
                    min_ratio: float) -> float:
    """Teacher MACs / student MACs at ``size``; ValueError below ``min_ratio`` (before any training)."""
    shape = (1, 3, *size)
    t_macs, s_macs = count_macs(build_model(teacher), shape), count_macs(build_model(student), shape)
    ratio = t_macs / s_macs
    if ratio < min_ratio:
        raise ValueError(f"teacher {teacher.encoder} has {t_macs / 1e9:.3f} GMACs, only {ratio:.1f}x "
                         f"the student {student.encoder}'s {s_macs / 1e9:.3f} GMACs at {size[0]}x"
                         f"{size[1]}; the benchmark needs >= {min_ratio:g}x (a bigger teacher "
                         "or a smaller student)")
    log.info("MACs: teacher %.3f G / student %.3f G = %.1fx", t_macs / 1e9, s_macs / 1e9, ratio)
    return ratio


def supervised_config(preset: BenchPreset, which: str, train_root: Path) -> TrainConfig:
    """The teacher's or student's TrainConfig: its base YAML + overrides, on target train."""
    spec = getattr(preset, which)
    cfg = load_train_config(resolve_config(spec.base), spec.overrides)
    data = replace(cfg.data, root=str(train_root), reader="sim", val_root=None, val_reader=None,
                   height=preset.data.height, width=preset.data.width)
    return replace(cfg, data=data, eval_every=0)


def distill_config(preset: BenchPreset, row: str, student: ModelConfig, teacher: Path,
                   sim_root: Path) -> DistillConfig:
    """config/distill/<row>.yaml + the preset's overrides, on the benchmark's sim set and teacher."""
    spec = preset.distill
    cfg = load_distill_config(resolve_config(f"config/distill/{row}.yaml"), spec.overrides)
    # the paper halves the rate every 5 epochs; an epoch here is the sim set at this batch size
    step_size = max(1, round(spec.halve_every_epochs * preset.data.sim / spec.batch_size))
    optim = replace(cfg.optim, batch_size=spec.batch_size, step_size=step_size)
    data = replace(cfg.data, root=str(sim_root), reader="sim", height=preset.data.height,
                   width=preset.data.width)
    return replace(cfg, teacher=str(teacher), model=student, data=data, optim=optim,
                   max_steps=spec.max_steps)


def evaluate_checkpoint(path: Path, test_root: Path, preset: BenchPreset, progress: bool
                        ) -> dict[str, Any]:
    """AbsRel/RMSE/delta1... on target test, plus params, MACs and CPU latency at batch 1."""
    ev, size = preset.eval, (preset.data.height, preset.data.width)
    teacher = load_teacher(path)
    dataset = DepthDataset(build_reader("sim", test_root), *size)
    metrics = evaluate_model(teacher, dataset, min_depth=ev.min_depth, max_depth=ev.max_depth,
                             batch_size=ev.batch_size, progress=progress)
    return {**metrics, **model_cost(teacher, (1, 3, *size), ev.latency_runs)}


def _transform(preset: BenchPreset, cache: BenchCache, teacher: Path, teacher_sha: str,
               sim_root: Path) -> dict[str, Any] | None:
    spec = preset.transform
    if spec is None:
        return None
    h, w = preset.data.height, preset.data.width
    key = {"teacher": teacher_sha, "data": sim_root.name, "size": [h, w], **asdict(spec)}
    return cache.result("transform", "transform", key, lambda: bench_transform(
        load_teacher(teacher), str(sim_root), "sim", h, w, spec.batch_size, spec.g_steps,
        spec.max_iterations, spec.lr_x))


def run_bench(preset: BenchPreset, out: str | Path, force: list[str] | None = None,
              progress: bool = True, preset_name: str = "custom") -> BenchResult:
    """Every stage of the benchmark, each cached under ``out``; ``force`` rows are recomputed."""
    start = time.perf_counter()
    known = {"teacher", "student", "transform", *preset.rows}
    unknown = sorted(set(force or []) - known)
    if unknown:
        raise ValueError(f"--force names unknown row(s) {unknown}; rows: {sorted(known)}")
    cache, d = BenchCache(out, force or []), preset.data
    roots = {split: cache.dataset(split, style, getattr(d, split), d.height, d.width,
                                  d.seed + offset, d.workers)
             for split, (style, offset) in SPLITS.items()}
    configs: dict[str, TrainConfig] = {w: supervised_config(preset, w, roots["target_train"])
                                       for w in ("teacher", "student")}
    ratio = check_mac_ratio(configs["teacher"].model, configs["student"].model,
                            (d.height, d.width), preset.min_mac_ratio)
    runs = {w: cache.train(w, configs[w], train_supervised) for w in ("teacher", "student")}
    teacher, teacher_sha = runs["teacher"][0], file_hash(runs["teacher"][0])
    for row in preset.rows:
        configs[row] = distill_config(preset, row, configs["student"].model, teacher, roots["sim"])
        runs[row] = cache.train(row, configs[row], distill, extra={"teacher_sha": teacher_sha})
    results: dict[str, dict[str, Any]] = {}
    for name, (ckpt, seconds) in runs.items():
        key = {"checkpoint": file_hash(ckpt), "test": roots["target_test"].name,
               "eval": asdict(preset.eval), "size": [d.height, d.width]}
        metrics = cache.result(name, "eval", key, lambda c=ckpt: evaluate_checkpoint(
            c, roots["target_test"], preset, progress))
        results[name] = {**metrics, "steps": configs[name].max_steps, "train_s": seconds}
    transform = _transform(preset, cache, teacher, teacher_sha, roots["sim"])
    return _write(preset, preset_name, Path(out), results, transform, ratio, cache,
                  time.perf_counter() - start)


def _header(preset: BenchPreset, name: str, ratio: float, seconds: float, train_s: float
            ) -> list[str]:
    d, t, s = preset.data, preset.teacher, preset.student
    return [f"# depthkd benchmark: preset `{name}`", "",
            f"`depthkd bench --preset {name}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
            f"training of all rows {train_s / 60:.1f} min (when each was trained); wall time of "
            f"this invocation {seconds / 60:.1f} min (cached stages cost ~0).",
            f"Data: target train {d.target_train}, target test {d.target_test}, sim {d.sim} frames "
            f"at {d.height}x{d.width}. Teacher `{t.base}` {t.overrides}; student `{s.base}` "
            f"{s.overrides}; teacher/student MACs {ratio:.1f}x. Distillation: "
            f"{preset.distill.max_steps} steps, batch {preset.distill.batch_size}, sim images only."]


def _write(preset: BenchPreset, name: str, out: Path, results: dict[str, dict[str, Any]],
           transform: dict[str, Any] | None, ratio: float, cache: BenchCache,
           seconds: float) -> BenchResult:
    rows, claim = build_rows(results), check_claim(results)
    spec = preset.transform
    text = (format_report(transform, spec.batch_size, preset.data.height, preset.data.width)
            if transform is not None and spec is not None else None)
    train_s = sum(r["train_s"] for r in results.values())
    report = render_report(rows, claim, _header(preset, name, ratio, seconds, train_s), text)
    md, js = out / "report.md", out / "report.json"
    md.write_text(report)
    js.write_text(json.dumps({"preset": name, "preset_config": asdict(preset), "rows": rows,
                              "claim": claim, "transform": transform, "mac_ratio": ratio,
                              "trained": cache.trained, "cache_hits": cache.hits,
                              "seconds": seconds}, indent=2, default=str) + "\n")
    return BenchResult(rows, claim, transform, ratio, cache.trained, cache.hits, md, js, seconds)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="quick",
                        help="quick | full (config/bench/<name>.yaml) or a preset YAML path")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default runs/bench/<preset>)")
    parser.add_argument("--force", action="append", default=[], metavar="ROW",
                        help="recompute this row (teacher, student, a distillation row, transform); repeatable")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars while evaluating")


def run_cli(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    preset = load_preset(args.preset)
    name = Path(args.preset).stem
    out = args.out if args.out is not None else Path("runs/bench") / name
    out.mkdir(parents=True, exist_ok=True)
    result = run_bench(preset, out, args.force, progress=not args.no_progress, preset_name=name)
    print(result.report_md.read_text(), end="")
    print(f"trained: {result.trained or 'nothing (all cached)'}; report: {result.report_md}, "
          f"{result.report_json}; {result.seconds / 60:.1f} min")
    return 0
