"""Result cache of `depthkd bench`: every stage is keyed by a hash of what determines it.

Datasets by their ``write_dataset`` arguments, trained checkpoints by their resolved
config (plus the teacher's weights for distillation), evaluations by the checkpoint's
bytes and the evaluation settings. A second run therefore reuses everything finished;
an interrupted training resumes from its last step checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from depthkd_core.atomic import atomic_open
from depthkd_core.data.simulator import write_dataset
from depthkd_core.train.config import TrainConfig
from depthkd_core.train.trainer import checkpoints

log = logging.getLogger(__name__)

_DONE = "bench_done.json"
# Fields that say where a run goes, not what it computes.
_PLACEMENT = ("out_dir", "resume")
# Fields added after runs were cached, at the value that computes what those runs did:
# left out of the hash at that value, so adding a field never invalidates a cache.
# Dotted keys name fields of nested sections.
_NEUTRAL = {"teacher_output": "auto", "model.encoder_channels": None}


def config_hash(data: Any) -> str:
    """12 hex digits of the SHA-256 of ``data`` as canonical JSON."""
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_hash(path: str | Path) -> str:
    """16 hex digits of the SHA-256 of a file's bytes."""
    return file_sha256(path)[:16]


def run_hash(cfg: TrainConfig, extra: dict[str, Any] | None = None) -> str:
    """Hash of a resolved training config without its placement fields, plus ``extra``."""
    data = {k: v for k, v in asdict(cfg).items() if k not in _PLACEMENT}
    for key, neutral in _NEUTRAL.items():
        *parents, field = key.split(".")
        section = data
        for parent in parents:
            section = section.get(parent) if isinstance(section, dict) else None
        if isinstance(section, dict) and field in section and section[field] == neutral:
            del section[field]
    return config_hash({"config": data, **(extra or {})})


def _safe(name: str) -> str:
    """A stage name as a file name (``relative:teacher`` -> ``relative_teacher``)."""
    return name.replace(":", "_")


class BenchCache:
    """Stage cache under ``out``; ``force`` names rows recomputed once in this run.

    ``trained`` and ``hits`` list what this run computed and what it reused.
    """

    def __init__(self, out: str | Path, force: Iterable[str] = ()) -> None:
        self.out = Path(out)
        self.force = set(force)
        self.trained: list[str] = []
        self.hits: list[str] = []

    def _forced(self, name: str, path: Path) -> bool:
        if name in self.force and path.exists():
            log.info("--force %s: removing %s", name, path)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            return True
        return False

    def dataset(self, split: str, style: str, n: int, height: int, width: int, seed: int,
                workers: int) -> Path:
        """``write_dataset`` into data/<split>-<hash>/, unless a finished copy is there."""
        spec = {"style": style, "n": n, "height": height, "width": width, "seed": seed}
        root = self.out / "data" / f"{split}-{config_hash(spec)}"
        if (root / _DONE).is_file():
            self.hits.append(f"data:{split}")
            log.info("cache hit: %s data (%d frames) in %s", split, n, root)
            return root
        log.info("rendering %s: %d %s frames at %dx%d", split, n, style, height, width)
        write_dataset(root, style, n, height, width, seed=seed, workers=workers)
        (root / _DONE).write_text(json.dumps(spec) + "\n")
        return root

    def train(self, name: str, cfg: TrainConfig, run: Callable[[Any], Path],
              extra: dict[str, Any] | None = None) -> tuple[Path, float]:
        """Run ``run(cfg)`` in runs/<name>-<hash>/ unless its final.pt exists.

        Returns (final.pt, training seconds). A folder with step checkpoints but no
        final.pt is an interrupted run: it resumes.
        """
        run_dir = self.out / "runs" / f"{name}-{run_hash(cfg, extra)}"
        self._forced(name, run_dir)
        final, timing = run_dir / "final.pt", run_dir / "bench_time.json"
        if final.is_file() and timing.is_file():
            self.hits.append(name)
            log.info("cache hit: %s (%s)", name, final)
            return final, json.loads(timing.read_text())["seconds"]
        resume = bool(checkpoints(run_dir))
        log.info("training %s: %d steps -> %s%s", name, cfg.max_steps, run_dir,
                 " (resuming)" if resume else "")
        start = time.perf_counter()
        final = run(replace(cfg, out_dir=str(run_dir), resume=resume))
        seconds = time.perf_counter() - start
        timing.write_text(json.dumps({"seconds": seconds, "resumed": resume}) + "\n")
        self.trained.append(name)
        return final, seconds

    def _lookup(self, name: str, kind: str, key: Any, suffix: str) -> tuple[Path, bool]:
        """(<kind>/<name>-<hash><suffix>, whether a finished copy is there); --force removes it."""
        path = self.out / kind / f"{_safe(name)}-{config_hash(key)}{suffix}"
        self._forced(name, path)
        if path.is_file():
            self.hits.append(f"{kind}:{name}")
            log.info("cache hit: %s of %s (%s)", kind, name, path)
            return path, True
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, False

    def file(self, name: str, kind: str, key: Any, suffix: str, make: Callable[[Path], Any]) -> Path:
        """A file made by ``make(path)`` (which writes it atomically), unless it exists."""
        path, hit = self._lookup(name, kind, key, suffix)
        if not hit:
            make(path)
            self.trained.append(name)
        return path

    def result(self, name: str, kind: str, key: Any, compute: Callable[[], dict[str, Any]]
               ) -> dict[str, Any]:
        """A JSON result (evaluation, bench-transform) in <kind>/<name>-<hash>.json."""
        path, hit = self._lookup(name, kind, key, ".json")
        if hit:
            return json.loads(path.read_text())
        value = compute()
        with atomic_open(path, "w") as f:
            f.write(json.dumps(value, indent=2) + "\n")
        return value
