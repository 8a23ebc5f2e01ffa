"""Benchmark presets (config/bench/*.yaml): every size, step count and run of `depthkd bench`.

A preset names base configs (config/train/*.yaml, config/distill/<row>.yaml) plus
``key=value`` overrides; the benchmark adds only what it owns (data roots, image
size, output folders, the teacher path and the distillation schedule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from depthkd_core.config import from_dict, load_config, parse_yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESET_DIR = REPO_ROOT / "config" / "bench"
# split -> (simulator style, seed offset)
SPLITS = {"target_train": ("target", 0), "target_test": ("target", 1), "sim": ("sim", 2)}


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


ROW_DATA = ("sim", "target_train")


@dataclass
class RowSpec:
    """A row of a section: config/distill/<config>.yaml under ``name``.

    teacher: ``teacher`` or a key of ``BenchPreset.teachers``. relative_teacher: the
    rows get that teacher as a relative-disparity ONNX file (bench/relative.py) and
    are evaluated ``lsq``-aligned. data: the transfer images (target_train: the
    target domain's training images; depth is read only by methods that use labels).
    The student is the bench student's encoder and decoder with the row config's head
    (and LG-Conv) settings. overrides: ``key=value`` on the row's config after the preset's
    (e.g. one point of a hyper-parameter sweep).
    """

    name: str
    config: str
    teacher: str = "teacher"
    relative_teacher: bool = False
    data: str = "target_train"
    overrides: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        """The stage this row distils from: its teacher, or ``relative:<teacher>``."""
        return f"relative:{self.teacher}" if self.relative_teacher else self.teacher

    def __post_init__(self) -> None:
        if self.data not in ROW_DATA:
            raise ValueError(f"row {self.name}: data must be one of {ROW_DATA}, got '{self.data}'")
        resolve_config(f"config/distill/{self.config}.yaml")


@dataclass
class SectionSpec:
    """A table of rows testing one paper's claims.

    pairs: [worse, better] row names (or ``teacher``/``student``/``relative:<teacher>``)
    whose AbsRel the paper orders; the report says per pair whether it held.
    """

    title: str
    claim: str
    rows: list[RowSpec] = field(default_factory=list)
    pairs: list[list[str]] = field(default_factory=list)


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
    teachers: dict[str, RunSpec] = field(default_factory=dict)
    sections: list[SectionSpec] = field(default_factory=list)
    sections_file: str | None = None    # a YAML list of sections, added before ``sections``

    def __post_init__(self) -> None:
        if self.sections_file:
            self.sections = load_sections(self.sections_file) + self.sections
        names = self.rows + [r.name for s in self.sections for r in s.rows]
        reserved = {"teacher", "student", "transform", *self.teachers} & set(names)
        if reserved or len(set(names)) != len(names):
            raise ValueError(f"bench rows must have distinct names other than teacher, student, "
                             f"transform and the extra teachers, got {names}")
        for row in self.rows:
            resolve_config(f"config/distill/{row}.yaml")
        known = {"teacher", "student", *names, *self.teachers,
                 *(r.source for s in self.sections for r in s.rows)}
        for section in self.sections:
            for row in section.rows:
                if row.teacher != "teacher" and row.teacher not in self.teachers:
                    raise ValueError(f"row {row.name}: unknown teacher '{row.teacher}'; "
                                     f"known: teacher, {', '.join(self.teachers) or '(no others)'}")
            for pair in section.pairs:
                if len(pair) != 2 or not set(pair) <= known:
                    raise ValueError(f"section '{section.title}': pair {pair} must name two of "
                                     f"{sorted(known)}")

    def section_rows(self) -> list[RowSpec]:
        return [row for section in self.sections for row in section.rows]


def load_sections(path: str | Path) -> list[SectionSpec]:
    """The sections listed in a YAML file (config/bench/sections.yaml)."""
    resolved = resolve_config(path)
    data = parse_yaml(resolved.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{resolved} must be a YAML list of sections, got {type(data).__name__}")
    return [from_dict(SectionSpec, item, f"{resolved.name}[{i}]") for i, item in enumerate(data)]


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
