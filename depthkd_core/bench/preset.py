"""Benchmark presets (config/bench/*.yaml): every size, step count and run of `depthkd bench`.

A preset names base configs (config/train/*.yaml, config/distill/<row>.yaml) plus
``key=value`` overrides; the benchmark adds only what it owns (data roots, image
size, output folders, the teacher path and the distillation schedule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from depthkd_core.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESET_DIR = REPO_ROOT / "config" / "bench"


@dataclass
class BenchData:
    """Frames rendered by ``simulator.write_dataset``; height/width are also the network size."""

    target_train: int
    target_test: int
    sim: int
    height: int = 128
    width: int = 160
    seed: int = 0          # target train uses seed, target test seed+1, sim seed+2
    workers: int = 1       # render processes (spawning a pool costs seconds: 1 for small sets)

    def __post_init__(self) -> None:
        if min(self.target_train, self.target_test, self.sim) < 1:
            raise ValueError(f"bench data sizes must be >= 1, got target_train={self.target_train}, "
                             f"target_test={self.target_test}, sim={self.sim}")
        if self.height % 32 or self.width % 32 or min(self.height, self.width) < 32:
            raise ValueError(f"bench data.height/width must be positive multiples of 32, "
                             f"got {self.height}x{self.width}")


@dataclass
class RunSpec:
    """A supervised run: a config/train YAML plus overrides (max_steps, optim.*, model.*)."""

    base: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class DistillSpec:
    """Shared by every distillation row (config/distill/<row>.yaml + overrides).

    The student architecture is always the supervised student's. ``optim.step_size``
    is ``halve_every_epochs`` epochs of the sim set at ``batch_size`` (the paper halves
    the rate every 5 epochs of its 50K images).
    """

    max_steps: int
    batch_size: int = 8
    halve_every_epochs: float = 5.0
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1 or self.halve_every_epochs <= 0:
            raise ValueError(f"distill needs max_steps >= 1, batch_size >= 1, halve_every_epochs > 0; "
                             f"got {self.max_steps}, {self.batch_size}, {self.halve_every_epochs}")


@dataclass
class EvalSpec:
    """Evaluation on the target test split (metric depth, no alignment, no crop)."""

    batch_size: int = 8
    latency_runs: int = 10
    min_depth: float = 1e-3
    max_depth: float = 10.0


@dataclass
class TransformSpec:
    """`bench-transform` on the benchmark's own teacher and sim images."""

    batch_size: int = 8
    g_steps: int = 100
    max_iterations: int = 1000
    lr_x: float = 0.01


@dataclass
class BenchPreset:
    """One benchmark: data, teacher, supervised student, distillation rows, evaluation."""

    data: BenchData
    teacher: RunSpec
    student: RunSpec
    distill: DistillSpec
    rows: list[str] = field(default_factory=list)
    min_mac_ratio: float = 10.0
    eval: EvalSpec = field(default_factory=EvalSpec)
    transform: TransformSpec | None = None

    def __post_init__(self) -> None:
        reserved = {"teacher", "student"} & set(self.rows)
        if reserved or len(set(self.rows)) != len(self.rows):
            raise ValueError(f"bench rows must be distinct config/distill names other than "
                             f"teacher/student, got {self.rows}")
        for row in self.rows:
            resolve_config(f"config/distill/{row}.yaml")


def resolve_config(path: str | Path) -> Path:
    """A config path as given, else relative to the repository root (config/... from anywhere)."""
    path = Path(path)
    if path.is_file():
        return path
    candidate = REPO_ROOT / path
    if not path.is_absolute() and candidate.is_file():
        return candidate
    raise FileNotFoundError(f"config file not found: {path} (also looked in {REPO_ROOT})")


def load_preset(name_or_path: str | Path) -> BenchPreset:
    """A preset by name (``quick``, ``full``: config/bench/<name>.yaml) or by YAML path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise ValueError(f"unknown bench preset '{name_or_path}'; known: {', '.join(known)}")
    return load_config(BenchPreset, path)
