"""The versioned model registry the live depth node reads (docs/online.md).

``ModelRegistry`` exports a checkpoint to ONNX, requires parity, publishes ``vNNNN.onnx``
atomically and keeps the earlier versions for ``rollback``. Importing it never imports
torch (only ``deploy`` does): distill_node's supervisor holds one from start-up, and a
torch import in flight there made the node miss launch's 5 s Ctrl-C deadline.
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


class DeployError(RuntimeError):
    """Export or parity failed: nothing was published."""


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

    def deploy(self, candidate_ckpt: str | Path, height: int, width: int) -> Path:
        """Export the checkpoint, require parity, publish it as the next version; DeployError if not.

        A model that fixes its own run size (``ModelConfig.input_size``, e.g. a fastdepth
        student) is exported at that size, not at ``height`` x ``width``: any other size
        would put a resize into the graph."""
        from depthkd_core.export.onnx_export import export_onnx  # torch: only to deploy
        from depthkd_core.models import load_checkpoint

        model, model_cfg, _ = load_checkpoint(candidate_ckpt)
        height, width = model_cfg.input_size or (height, width)
        state = self.state()
        version = int(state["next"])
        name = f"v{version:04d}.onnx"
        staging = self.dir / ".staging"
        staging.mkdir(exist_ok=True)
        try:
            report = export_onnx(model, staging / name, height, width)
            if not report.passed:
                raise DeployError(f"{candidate_ckpt}: ONNX parity failed ({report.summary()})")
            with open(staging / name, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(staging / name, self.dir / name)
        except DeployError:
            raise
        except Exception as exc:  # any exporter failure means no deploy
            raise DeployError(f"{candidate_ckpt}: ONNX export failed: {exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        entry = {"version": version, "file": name, "source": str(candidate_ckpt), "time": time.time()}
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
        kept = {entry["file"] for entry in state["stack"]}
        for path in self.dir.glob("v*.onnx"):
            if path.name not in kept:
                path.unlink(missing_ok=True)
