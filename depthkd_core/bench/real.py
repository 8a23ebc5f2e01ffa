"""`depthkd bench-real`: depth models judged on real RGB-D frames, and by how well they
agree with a teacher there.

    depthkd bench-real [--config config/bench/real.yaml] [--out runs/bench_real] [--rows A,B] [--update]

Every row is a model file (the students the recipes made, the teacher itself); every
column block a set of real frames (Redwood and TUM in ../shared by default). Per set:
accuracy against the frames' ground truth (metric, and per-image median-aligned),
agreement with the teacher (its depth as the reference: no labels needed), the
worst frame's agreement delta1 (the fidelity target holds on every frame, not on
average), and each model's params, MACs and CPU latency measured in the same run.
Real frames only judge here: nothing in this module trains or selects.

``--update`` measures only the rows asked for and merges them into the table already in
``--out``: a full table is hours of recipes, a new row minutes. Each row's latency is
paired with the teacher in its own run, and the table says which run measured which rows
(time, the teacher's latency then, pairs).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from depthkd_core.config import load_config
from depthkd_core.evaluate.judge import RealSet, frames_of, judge
from depthkd_core.evaluate.profile import measure_latency
from depthkd_core.evaluate.report import model_cost, to_markdown


@dataclass
class RealRow:
    """A model to judge: a file ``load_teacher`` opens (ONNX, TorchScript, checkpoint);
    ``recipe`` (config/student/*.yaml, with ``key=value`` ``overrides``) makes it when
    asked to (``--make``)."""

    name: str
    model: str
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)


@dataclass
class RealBenchConfig:
    """teacher: the reference for agreement. height/width: the frames are evaluated at
    this size (each model resizes to its own input and back, as the live node does).
    min_depth/max_depth: the evaluated depth range (metres). latency_rounds: back-to-back
    pairs (the model's runs, then the teacher's) per row; latency_runs: runs per model in
    each pair. A pair's ratio moves by +-0.05 on a shared machine, so the budget is read
    from many pairs: their median and their 75th percentile (three pairs in four at or
    under it: the figure a budget is safely met by)."""

    teacher: str
    rows: list[RealRow]
    sets: list[RealSet] = field(default_factory=lambda: RealBenchConfig.default_sets())
    height: int = 480
    width: int = 640
    min_depth: float = 0.1
    max_depth: float = 10.0
    latency_rounds: int = 15
    latency_runs: int = 10

    @staticmethod
    def default_sets(shared: Path = Path("../shared")) -> list[RealSet]:
        return [RealSet("redwood", "nyu_png", str(shared / "data" / "redwood_sample")),
                RealSet("tum", "tum", str(shared / "data" / "tum_sample"))]

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError("bench-real needs at least one row")
        if self.latency_rounds < 1 or self.latency_runs < 1:
            raise ValueError(f"latency_rounds and latency_runs must be >= 1, got "
                             f"{self.latency_rounds}, {self.latency_runs}")
        self.rows = [r if isinstance(r, RealRow) else RealRow(**r) for r in self.rows]
        self.sets = [s if isinstance(s, RealSet) else RealSet(**s) for s in self.sets]


def present_sets(sets: list[RealSet]) -> list[RealSet]:
    """``sets`` without the optional ones whose folder is missing (each said on stderr)."""
    kept = []
    for real in sets:
        if real.optional and not Path(real.root).is_dir():
            print(f"bench-real: optional set '{real.name}' left out: no folder {real.root}",
                  file=sys.stderr)
        else:
            kept.append(real)
    return kept


def _own_shape(model: Any, cfg: RealBenchConfig) -> tuple[int, int, int, int]:
    """A model's cost is measured at its own input size (no resize in the timing)."""
    return (1, 3, *(model.input_size or (cfg.height, cfg.width)))


def judge_on_real_sets(model_path: str | Path, teacher_path: str | Path | None = None,
                       sets: list[RealSet] | None = None, height: int = 480, width: int = 640,
                       min_depth: float = 0.1, max_depth: float = 10.0) -> dict[str, dict[str, float]]:
    """``judge`` of one model file on every frame set whose folder exists (default: Redwood
    and TUM in ../shared, relative to the working directory); {} when none does."""
    from depthkd_core.models.teachers import load_teacher

    present = [s for s in (sets or RealBenchConfig.default_sets()) if Path(s.root).is_dir()]
    if not present:
        return {}
    model = load_teacher(model_path)
    teacher = load_teacher(teacher_path) if teacher_path is not None else None
    return {s.name: judge(model, teacher, frames_of(s, height, width), min_depth, max_depth)
            for s in present}


def make_missing(rows: list[RealRow]) -> None:
    """Run the recipe of every row whose model file does not exist yet (each resumes)."""
    from depthkd_core.recipe import StudentRecipe, command_line, make_student

    for row in rows:
        if not Path(row.model).exists() and row.recipe is not None:
            recipe = load_config(StudentRecipe, row.recipe, row.overrides)
            make_student(recipe, command_line(row.recipe, row.overrides))
            if not Path(row.model).exists():
                raise ValueError(f"row '{row.name}': its recipe made {recipe.out_dir}, not {row.model}")


def paired_latency(model: Any, teacher: Any, cfg: RealBenchConfig) -> dict[str, float]:
    """``latency_ms`` of ``model`` (median) and its time over the teacher's in
    ``cfg.latency_rounds`` pairs measured back to back (so that a machine whose load changes
    during the run does not skew one row against another): ``latency_vs_teacher``, their
    median, and ``latency_vs_teacher_q75``, their 75th percentile."""
    pairs = [(measure_latency(model, _own_shape(model, cfg), runs=cfg.latency_runs)["median_ms"],
              measure_latency(teacher, _own_shape(teacher, cfg), runs=cfg.latency_runs)["median_ms"])
             for _ in range(cfg.latency_rounds)]
    ms, teacher_ms = (np.asarray(column) for column in zip(*pairs))
    ratios = ms / teacher_ms
    return {"latency_ms": float(np.median(ms)), "latency_vs_teacher": float(np.median(ratios)),
            "latency_vs_teacher_q75": float(np.percentile(ratios, 75)),
            "teacher_ms": float(np.median(teacher_ms))}


def run_real_bench(cfg: RealBenchConfig, out_dir: Path, update: bool = False) -> list[dict[str, Any]]:
    """One result row per (model, frame set); writes real.json and real.md to ``out_dir``
    (``update``: merged into the table there, replacing rows of the same names)."""
    from depthkd_core.models.teachers import load_teacher

    missing = [row for row in cfg.rows if not Path(row.model).exists()]
    if missing:
        raise FileNotFoundError(
            "missing models: " + "; ".join(f"{r.name}: {r.model}" for r in missing)
            + " (depthkd bench-real --make runs the rows' recipes)")
    teacher = load_teacher(cfg.teacher)
    sets = {s.name: frames_of(s, cfg.height, cfg.width) for s in present_sets(cfg.sets)}
    results, teacher_ms = [], []
    for row in cfg.rows:
        model = load_teacher(row.model)
        cost = model_cost(model, _own_shape(model, cfg), latency_runs=0)
        latency = paired_latency(model, teacher, cfg)
        teacher_ms.append(latency.pop("teacher_ms"))
        size = "x".join(map(str, model.input_size)) if model.input_size else "any"
        for name, frames in sets.items():
            results.append({"model": row.name, "set": name, "input": size,
                            **judge(model, teacher, frames, cfg.min_depth, cfg.max_depth), **cost,
                            **latency})
    run = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "teacher_latency_ms": float(np.median(teacher_ms)), "latency_pairs": cfg.latency_rounds,
           "rows": [row.name for row in cfg.rows]}
    meta = {"teacher": cfg.teacher,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
            "sets": [vars(s) for s in cfg.sets if s.name in sets], "runs": [run]}
    if update and (out_dir / "real.json").is_file():
        results, meta = merge_tables(json.loads((out_dir / "real.json").read_text()), results, meta)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "real.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1) + "\n")
    table = render(results, meta)
    (out_dir / "real.md").write_text(table)
    print(table, end="")
    return results


def _runs(meta: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that measured a table; a table written before runs were recorded is one run."""
    if "runs" in meta:
        return meta["runs"]
    return [{"date": meta["date"], "teacher_latency_ms": meta["teacher_latency_ms"],
             "latency_pairs": meta["latency_pairs"], "rows": list(dict.fromkeys(r["model"] for r in rows))}]


def merge_tables(old: dict[str, Any], rows: list[dict[str, Any]],
                 meta: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``rows`` (one new run, ``meta``) merged into the ``old`` table: a model measured again
    replaces its rows where they stood, a new one goes last. Only tables of the same teacher
    and frame sets merge: their figures would not be comparable otherwise."""
    for key in ("teacher", "sets"):
        if old["meta"].get(key) != meta[key]:
            raise ValueError(f"--update: the table in the output folder has another {key} "
                             f"({old['meta'].get(key)} against {meta[key]}); write a new table instead")
    new_names = list(dict.fromkeys(r["model"] for r in rows))
    runs = [{**run, "rows": [n for n in run["rows"] if n not in new_names]}
            for run in _runs(old["meta"], old["rows"])]
    order = list(dict.fromkeys([r["model"] for r in old["rows"]] + new_names))
    merged = [r for name in order for r in (rows if name in new_names else old["rows"])
              if r["model"] == name]
    return merged, {**meta, "runs": [run for run in runs if run["rows"]] + meta["runs"]}


COLUMNS = ("model", "set", "input", "gt_abs_rel", "gt_delta1", "gt_med_abs_rel", "gt_med_delta1",
           "agree_abs_rel", "agree_delta1", "agree_delta1_min", "params_M", "GMACs", "latency_ms",
           "latency_vs_teacher", "latency_vs_teacher_q75")


def render(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The table as markdown, with what it was measured against."""
    runs = _runs(meta, results)
    measured = "; ".join(
        f"{run['date']} (teacher {run['teacher_latency_ms']:.1f} ms, {run['latency_pairs']} pairs): "
        + ("every row" if len(runs) == 1 else ", ".join(run["rows"])) for run in runs)
    head = (f"Real frames ({', '.join(s['name'] for s in meta['sets'])}); "
            f"agreement: the teacher {Path(meta['teacher']).name} as reference; "
            "latency_vs_teacher: the median ratio of back-to-back pairs of the row's runs and the "
            "teacher's, _q75 their 75th percentile; gt_med: per-image median-aligned. "
            f"Measured {measured}.\n\n")
    return head + to_markdown(results, COLUMNS)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("config/bench/real.yaml"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_real"))
    parser.add_argument("--make", action="store_true",
                        help="first run the recipe of every row whose model is missing")
    parser.add_argument("--rows", default=None, help="only these rows (comma-separated names)")
    parser.add_argument("--update", action="store_true",
                        help="merge the rows measured into the table already in --out")


def run_cli(args: argparse.Namespace) -> int:
    cfg = load_config(RealBenchConfig, args.config)
    if args.rows is not None:
        wanted = [name.strip() for name in args.rows.split(",")]
        unknown = sorted(set(wanted) - {row.name for row in cfg.rows})
        if unknown:
            raise ValueError(f"unknown rows {unknown}; known: {[row.name for row in cfg.rows]}")
        cfg.rows = [row for row in cfg.rows if row.name in wanted]
    if args.make:
        make_missing(cfg.rows)  # trains on every core
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # latency comparable with the node's single-frame use
    try:
        run_real_bench(cfg, args.out, update=args.update)
    finally:
        torch.set_num_threads(threads)
    return 0
