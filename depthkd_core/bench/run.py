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
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from depthkd_core.bench.cache import BenchCache, file_hash
from depthkd_core.bench.preset import SPLITS, BenchPreset, RowSpec, load_preset, resolve_config
from depthkd_core.bench.relative import RELATIVE_OUTPUT, export_relative_teacher
from depthkd_core.bench.table import build_rows, check_claim, render_report, section_table
from depthkd_core.data import DepthDataset, build_reader
from depthkd_core.evaluate.profile import count_macs
from depthkd_core.evaluate.report import evaluate_model, model_cost
from depthkd_core.methods.config import DistillConfig, load_distill_config
from depthkd_core.bench.transform import bench_transform, format_report
from depthkd_core.methods.engine import distill
from depthkd_core.models import ModelConfig, build_model, load_teacher
from depthkd_core.train.config import TrainConfig, load_train_config
from depthkd_core.train.supervised import train_supervised

log = logging.getLogger(__name__)


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
    sections: list[dict[str, Any]]


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
    """A teacher's or the student's TrainConfig: its base YAML + overrides, on target train."""
    spec = preset.teachers[which] if which in preset.teachers else getattr(preset, which)
    cfg = load_train_config(resolve_config(spec.base), spec.overrides)
    data = replace(cfg.data, root=str(train_root), reader="sim", val_root=None, val_reader=None,
                   height=preset.data.height, width=preset.data.width)
    return replace(cfg, data=data, eval_every=0)


def distill_config(preset: BenchPreset, row: str, student: ModelConfig, teacher: Path,
                   sim_root: Path) -> DistillConfig:
    """config/distill/<row>.yaml + the preset's overrides, on the benchmark's sim set and teacher."""
    cfg = load_distill_config(resolve_config(f"config/distill/{row}.yaml"), preset.distill.overrides)
    return _placed(preset, cfg, student, teacher, sim_root, "sim", preset.data.sim)


def section_config(preset: BenchPreset, row: RowSpec, student: ModelConfig, teacher: Path,
                   roots: dict[str, Path]) -> DistillConfig:
    """A section row: its config with the bench student's encoder/decoder (keeping the row's
    head and LG-Conv), on ``row.data``, from ``teacher`` (relative ONNX when asked)."""
    cfg = load_distill_config(resolve_config(f"config/distill/{row.config}.yaml"),
                              [*preset.distill.overrides, *row.overrides])
    model = replace(cfg.model, encoder=student.encoder, decoder_channels=student.decoder_channels,
                    min_depth=student.min_depth, max_depth=student.max_depth)
    if row.relative_teacher:
        cfg = replace(cfg, teacher_output=RELATIVE_OUTPUT)
    return _placed(preset, cfg, model, teacher, roots[row.data], cfg.data.reader,
                   getattr(preset.data, row.data))


def _placed(preset: BenchPreset, cfg: DistillConfig, model: ModelConfig, teacher: Path,
            root: Path, reader: str, count: int) -> DistillConfig:
    """The benchmark's data (``count`` frames), size, student, teacher and schedule on a row's config."""
    spec = preset.distill
    # unlabelled readers take the rgb/ folder of the rendered split
    root = root / "rgb" if reader == "images" else root
    # the paper halves the rate every 5 epochs; an epoch here is the transfer set at this batch size
    step_size = max(1, round(spec.halve_every_epochs * count / spec.batch_size))
    optim = replace(cfg.optim, batch_size=spec.batch_size, step_size=step_size)
    data = replace(cfg.data, root=str(root), reader=reader, height=preset.data.height,
                   width=preset.data.width)
    return replace(cfg, teacher=str(teacher), model=model, data=data, optim=optim,
                   max_steps=spec.max_steps)


def evaluate_checkpoint(path: Path, test_root: Path, preset: BenchPreset, progress: bool,
                        output: str = "auto", alignment: str = "none") -> dict[str, Any]:
    """AbsRel/RMSE/delta1... on target test, plus params, MACs and CPU latency at batch 1.

    ``output``: what an ONNX file predicts (load_teacher); relative models are
    evaluated with ``alignment`` (lsq), in disparity space for inverse ones."""
    ev, size = preset.eval, (preset.data.height, preset.data.width)
    teacher = load_teacher(path, output=output)
    dataset = DepthDataset(build_reader("sim", test_root), *size)
    metrics = evaluate_model(teacher, dataset, min_depth=ev.min_depth, max_depth=ev.max_depth,
                             batch_size=ev.batch_size, progress=progress, alignment=alignment,
                             inverse=teacher.is_inverse)
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


@dataclass
class _Stage:
    """A model to evaluate: its file, how it is read, and what trained it."""

    path: Path
    seconds: float
    steps: int
    output: str = "auto"
    alignment: str = "none"

    @cached_property
    def sha(self) -> str:
        """The file's hash, read once: rows key on their teacher's, evaluations on their own."""
        return file_hash(self.path)


def evaluate_constant(train_root: Path, test_root: Path, preset: BenchPreset,
                      frames: int = 200) -> dict[str, Any]:
    """The trivial reference: every pixel at the median valid depth of (up to ``frames``
    evenly spaced) target-train frames. A distilled student must beat it to have learnt
    anything about the scene from its teacher."""
    ev, size = preset.eval, (preset.data.height, preset.data.width)
    train = DepthDataset(build_reader("sim", train_root), *size)
    picks = np.linspace(0, len(train) - 1, min(frames, len(train))).round().astype(int)
    samples = [train[int(i)] for i in picks]
    depths = torch.cat([sample["depth"][sample["valid"]] for sample in samples])
    value = float(depths.median())
    test = DepthDataset(build_reader("sim", test_root), *size)
    metrics = evaluate_model(lambda x: torch.full((x.shape[0], 1, *x.shape[-2:]), value), test,
                             min_depth=ev.min_depth, max_depth=ev.max_depth,
                             batch_size=ev.batch_size, progress=False)
    return {**metrics, "depth_m": value, "params_M": 0.0, "GMACs": 0.0}


def stage_names(preset: BenchPreset) -> list[str]:
    """Every name ``--rows``/``--force`` accept, in run order."""
    relative = sorted({r.source for r in preset.section_rows() if r.relative_teacher})
    return ["constant", "teacher", *preset.teachers, "student", *preset.rows, *relative,
            *(r.name for r in preset.section_rows()), "transform"]


def run_bench(preset: BenchPreset, out: str | Path, force: list[str] | None = None,
              progress: bool = True, preset_name: str = "custom",
              only: list[str] | None = None) -> BenchResult:
    """Every stage of the benchmark, each cached under ``out``; ``force`` stages are recomputed.

    ``only``: run just these stages (and the teachers they need), e.g. one process per
    core; a last run without ``only`` collects every row from the cache into the report.
    """
    start = time.perf_counter()
    known = stage_names(preset)
    unknown = sorted(set(force or []) - set(known)) + sorted(set(only or []) - set(known))
    if unknown:
        raise ValueError(f"--force/--rows name unknown stage(s) {unknown}; stages: {known}")
    wanted = set(known if only is None else only)
    needed = wanted | {r.teacher for r in preset.section_rows() if wanted & {r.name, r.source}}
    if wanted & {*preset.rows, "transform"}:
        needed.add("teacher")
    # absolute: the data roots are part of every run's config hash, so `--out runs/bench/x`
    # and `--out /abs/runs/bench/x` must name the same runs
    cache, d = BenchCache(Path(out).resolve(), force or []), preset.data
    roots = {split: cache.dataset(split, style, getattr(d, split), d.height, d.width,
                                  d.seed + offset, d.workers)
             for split, (style, offset) in SPLITS.items()}
    supervised = ["teacher", *preset.teachers, "student"]
    configs: dict[str, TrainConfig] = {w: supervised_config(preset, w, roots["target_train"])
                                       for w in supervised}
    ratios = {w: check_mac_ratio(configs[w].model, configs["student"].model, (d.height, d.width),
                                 preset.min_mac_ratio) for w in supervised if w != "student"}
    stages: dict[str, _Stage] = {}
    for w in supervised:
        if w in needed:
            path, seconds = cache.train(w, configs[w], train_supervised)
            stages[w] = _Stage(path, seconds, configs[w].max_steps)
    student = configs["student"].model
    for row in preset.rows:
        if row in wanted:
            teacher = stages["teacher"]
            cfg = distill_config(preset, row, student, teacher.path, roots["sim"])
            path, seconds = cache.train(row, cfg, distill, extra={"teacher_sha": teacher.sha})
            stages[row] = _Stage(path, seconds, cfg.max_steps)
    for row in preset.section_rows():
        if row.relative_teacher and wanted & {row.name, row.source} and row.source not in stages:
            stages[row.source] = _relative_stage(cache, row.source, stages[row.teacher], d)
        if row.name in wanted:
            teacher = stages[row.source]
            cfg = section_config(preset, row, student, teacher.path, roots)
            path, seconds = cache.train(row.name, cfg, distill, extra={"teacher_sha": teacher.sha})
            stages[row.name] = _Stage(path, seconds, cfg.max_steps,
                                      alignment="lsq" if row.relative_teacher else "none")
    results: dict[str, dict[str, Any]] = {}
    if "constant" in wanted:
        key = {"train": roots["target_train"].name, "test": roots["target_test"].name,
               "eval": asdict(preset.eval), "size": [d.height, d.width]}
        results["constant"] = {**cache.result("constant", "eval", key, lambda: evaluate_constant(
            roots["target_train"], roots["target_test"], preset)), "steps": 0, "train_s": 0.0,
            "alignment": "none"}
    for name, stage in stages.items():
        key = {"checkpoint": stage.sha, "test": roots["target_test"].name,
               "eval": asdict(preset.eval), "size": [d.height, d.width], "output": stage.output,
               "alignment": stage.alignment}
        metrics = cache.result(name, "eval", key, lambda s=stage: evaluate_checkpoint(
            s.path, roots["target_test"], preset, progress, s.output, s.alignment))
        results[name] = {**metrics, "steps": stage.steps, "train_s": stage.seconds,
                         "alignment": stage.alignment}
    transform = None
    if "transform" in wanted:
        transform = _transform(preset, cache, stages["teacher"].path, stages["teacher"].sha,
                               roots["sim"])
    return _write(preset, preset_name, Path(out), results, transform, ratios, cache,
                  time.perf_counter() - start)


def _relative_stage(cache: BenchCache, name: str, teacher: _Stage, d: Any) -> _Stage:
    """The teacher as a relative-disparity ONNX file (bench/relative.py), cached."""
    key = {"teacher": teacher.sha, "size": [d.height, d.width]}
    start = time.perf_counter()
    path = cache.file(name, "relative", key, ".onnx",
                      lambda p: export_relative_teacher(teacher.path, p, d.height, d.width))
    return _Stage(path, time.perf_counter() - start, 0, RELATIVE_OUTPUT, "lsq")


def _header(preset: BenchPreset, name: str, ratios: dict[str, float], seconds: float,
            train_s: float) -> list[str]:
    d, t, s = preset.data, preset.teacher, preset.student
    extra = "".join(f"; teacher `{k}`: `{v.base}` {v.overrides}" for k, v in preset.teachers.items())
    macs = ", ".join(f"{k} {r:.1f}x" for k, r in ratios.items())
    return [f"# depthkd benchmark: preset `{name}`", "",
            f"`depthkd bench --preset {name}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
            f"training of all rows {train_s / 60:.1f} min (when each was trained); wall time of "
            f"this invocation {seconds / 60:.1f} min (cached stages cost ~0).",
            f"Data: target train {d.target_train}, target test {d.target_test}, sim {d.sim} frames "
            f"at {d.height}x{d.width}. Teacher `{t.base}` {t.overrides}; student `{s.base}` "
            f"{s.overrides}{extra}; teacher/student MACs: {macs}. Distillation: "
            f"{preset.distill.max_steps} steps, batch {preset.distill.batch_size}; the data-free "
            "rows on sim images only, section rows on the images they name."]


def _sections(preset: BenchPreset, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each section's table: the teachers its rows learn from, then its rows."""
    tables = []
    for section in preset.sections:
        refs: list[tuple[str, str]] = []
        for row in section.rows:
            ref = row.source
            label = (f"Teacher `{row.teacher}` as relative disparity (ONNX)" if row.relative_teacher
                     else f"Teacher `{row.teacher}` (supervised)")
            if (ref, label) not in refs:
                refs.append((ref, label))
        rows = refs + [(r.name, f"`{r.config}`") for r in section.rows]
        tables.append(section_table(section.title, section.claim, rows, section.pairs, results))
    return tables


def _write(preset: BenchPreset, name: str, out: Path, results: dict[str, dict[str, Any]],
           transform: dict[str, Any] | None, ratios: dict[str, float], cache: BenchCache,
           seconds: float) -> BenchResult:
    main = {k: v for k, v in results.items() if k in ("constant", "teacher", "student", *preset.rows)}
    rows, claim, sections = build_rows(main), check_claim(main), _sections(preset, results)
    spec = preset.transform
    text = (format_report(transform, spec.batch_size, preset.data.height, preset.data.width)
            if transform is not None and spec is not None else None)
    train_s = sum(r["train_s"] for r in results.values())
    report = render_report(rows, claim, _header(preset, name, ratios, seconds, train_s), text, sections)
    md, js = out / "report.md", out / "report.json"
    md.write_text(report)
    js.write_text(json.dumps({"preset": name, "preset_config": asdict(preset), "rows": rows,
                              "claim": claim, "sections": sections, "transform": transform,
                              "mac_ratio": ratios["teacher"], "mac_ratios": ratios,
                              "trained": cache.trained, "cache_hits": cache.hits,
                              "seconds": seconds}, indent=2, default=str) + "\n")
    return BenchResult(rows, claim, transform, ratios["teacher"], cache.trained, cache.hits, md, js,
                       seconds, sections)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="quick",
                        help="quick | full (config/bench/<name>.yaml) or a preset YAML path")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default runs/bench/<preset>)")
    parser.add_argument("--force", action="append", default=[], metavar="ROW",
                        help="recompute this stage (teacher, student, a row, transform); repeatable")
    parser.add_argument("--rows", default=None, metavar="A,B,...",
                        help="run only these stages (and the teachers they need), e.g. a second "
                             "process on the other core; a run without --rows collects them all")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars while evaluating")


def run_cli(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    preset = load_preset(args.preset)
    name = Path(args.preset).stem
    out = args.out if args.out is not None else Path("runs/bench") / name
    out.mkdir(parents=True, exist_ok=True)
    only = [r for r in args.rows.split(",") if r] if args.rows is not None else None
    result = run_bench(preset, out, args.force, progress=not args.no_progress, preset_name=name,
                       only=only)
    print(result.report_md.read_text(), end="")
    print(f"trained: {result.trained or 'nothing (all cached)'}; report: {result.report_md}, "
          f"{result.report_json}; {result.seconds / 60:.1f} min")
    return 0
