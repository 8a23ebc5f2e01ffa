"""The versioned model registry the live depth node reads (docs/online.md).

``ModelRegistry`` publishes a gated candidate as ``vNNNN.onnx`` with its checkpoint beside
it as ``vNNNN.pt`` (the ``X.onnx`` -> ``X.pt`` convention that tells the next round where
to start) and keeps the earlier versions for ``rollback``. No torch: the export and its
parity check happen in the fine-tuning process (``online.finetune``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from depthkd_core.atomic import atomic_open

STATE = "current.json"


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    with atomic_open(path, "w") as handle:
        json.dump(data, handle, indent=1)


class ModelRegistry:
    """Versions ``models_dir/v0001.onnx, v0002.onnx, ...`` and ``current.json``.

    current.json: ``{"stack": [{"version", "file", "source", "time"}...], "next": int}``; the
    last stack entry is current, the one before it previous. ``rollback`` pops the current
    entry; version numbers are never reused. The stack holds the last ``keep`` versions and
    version files outside it (rolled back or too old) are deleted, so disk use is bounded.
    """

    def __init__(self, models_dir: str | Path, keep: int = 5) -> None:
        if keep < 2:
            raise ValueError(f"ModelRegistry keep must be >= 2 (current and previous), got {keep}")
        self.dir, self.keep = Path(models_dir), keep
        self.dir.mkdir(parents=True, exist_ok=True)
        staging = self.dir / ".staging"
        if staging.is_dir():  # a deploy that died mid-export
            shutil.rmtree(staging)

    def state(self) -> dict[str, Any]:
        path = self.dir / STATE
        return json.loads(path.read_text()) if path.is_file() else {"stack": [], "next": 1}

    def _entry(self, offset: int) -> Path | None:
        stack = self.state()["stack"]
        return self.dir / stack[-offset]["file"] if len(stack) >= offset else None

    def current(self) -> Path | None:
        return self._entry(1)

    def previous(self) -> Path | None:
        return self._entry(2)

    def version(self) -> int | None:
        stack = self.state()["stack"]
        return int(stack[-1]["version"]) if stack else None

    def versions(self) -> list[int]:
        """The stack's version numbers, oldest first (the last is current)."""
        return [int(entry["version"]) for entry in self.state()["stack"]]

    def find(self, source: str | Path) -> Path | None:
        """The version published from the checkpoint ``source`` still on the stack, if any."""
        entry = next((e for e in self.state()["stack"] if e["source"] == str(source)), None)
        return self.dir / entry["file"] if entry else None

    def publish(self, onnx: str | Path, checkpoint: str | Path) -> Path:
        """Copy the candidate ``onnx`` (and its ``checkpoint``) in as the next version.

        Both are copied through ``.staging/`` and renamed into place, the ONNX last, then
        ``current.json`` is replaced: a crash at any point leaves the previous state plus at
        most a stray file in ``.staging/`` (removed at the next open). Publishing the same
        ``checkpoint`` again returns its version (a restart after the publish)."""
        done = self.find(checkpoint)
        if done is not None:
            return done
        state = self.state()
        version = int(state["next"])
        name = f"v{version:04d}.onnx"
        staging = self.dir / ".staging"
        staging.mkdir(exist_ok=True)
        try:
            for src, dst in ((checkpoint, Path(name).with_suffix(".pt")), (onnx, Path(name))):
                with atomic_open(staging / dst, "wb") as out, open(src, "rb") as inp:
                    shutil.copyfileobj(inp, out)
                os.replace(staging / dst, self.dir / dst)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        entry = {"version": version, "file": name, "source": str(checkpoint), "time": time.time()}
        self._publish({"stack": [*state["stack"], entry], "next": version + 1})
        return self.dir / name

    def rollback(self) -> Path:
        """Make the previous version current again; ValueError when there is none."""
        state = self.state()
        if len(state["stack"]) < 2:
            raise ValueError(f"{self.dir}: no previous model version to roll back to")
        self._publish({**state, "stack": state["stack"][:-1]})
        return self.dir / state["stack"][-2]["file"]

    def _publish(self, state: dict[str, Any]) -> None:
        """Write current.json atomically, then delete version files the stack no longer holds."""
        state = {**state, "stack": state["stack"][-self.keep:]}
        _write_json_atomic(self.dir / STATE, state)
        kept = {Path(entry["file"]).stem for entry in state["stack"]}
        for path in [*self.dir.glob("v*.onnx"), *self.dir.glob("v*.pt")]:
            if path.stem not in kept:
                path.unlink(missing_ok=True)
