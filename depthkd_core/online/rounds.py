"""Fine-tuning rounds as the distill node runs them: persisted bookkeeping and the
round itself in a separate process (torch stays out of the node; a crashed or
hung trainer cannot take the node with it). No torch import here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from depthkd_core.atomic import atomic_open


class RoundState:
    """Round bookkeeping persisted atomically in ``path`` (state.json): resume on restart."""

    def __init__(self, path: Path) -> None:
        self.path, self._lock = path, threading.Lock()  # supervisor and rollback both save
        data = json.loads(path.read_text()) if path.is_file() else {}
        self.rounds: int = data.get("rounds", 0)
        self.trained_keys: set[str] = set(data.get("trained_keys", []))
        self.init_checkpoint: str = data.get("init_checkpoint", "")
        self.deployed_rounds: list[int] = data.get("deployed_rounds", [])
        self.last_loss: float | None = data.get("last_loss")
        self.last_gate: dict[str, Any] | None = data.get("last_gate")
        self.on_base: bool = data.get("on_base", False)  # rolled back past the first deploy

    def save(self) -> None:
        data = {"rounds": self.rounds, "trained_keys": sorted(self.trained_keys),
                "init_checkpoint": self.init_checkpoint, "deployed_rounds": self.deployed_rounds,
                "last_loss": self.last_loss, "last_gate": self.last_gate,
                "on_base": self.on_base}
        with self._lock, atomic_open(self.path, "w") as f:
            json.dump(data, f)


def parse_round_result(stdout: str) -> dict[str, Any]:
    """The fine-tuning process's last stdout line: JSON with checkpoint, steps, loss."""
    lines = [line for line in stdout.strip().splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
        _ = result["checkpoint"], result["loss"]
    except (IndexError, ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f"fine-tuning printed no result line: {stdout[-300:]!r}") from exc
    return result


def run_round_process(store: Path, init: str | Path, work: Path, config: str, timeout_s: float,
                      stop: threading.Event) -> dict[str, Any] | None:
    """``python -m depthkd_core.online.finetune`` on ``store`` from ``init`` in ``work``.

    The same ``work`` on a retry resumes the round. Returns its result line; None when
    ``stop`` was set (the process is killed); RuntimeError on a timeout or a failure,
    whose output is in work/finetune.log.
    """
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "depthkd_core.online.finetune", "--store", str(store),
           "--init", str(init), "--work", str(work)]
    if config:
        cmd += ["--config", config]
    out_path = work / "result.out"  # a file, not a pipe: a chatty trainer cannot block
    with open(out_path, "w") as out, open(work / "finetune.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=out, stderr=log)
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            if stop.wait(0.2) or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                if stop.is_set():
                    return None
                raise RuntimeError(f"fine-tuning in {work} exceeded {timeout_s:g} s")
    if proc.returncode != 0:
        raise RuntimeError(f"fine-tuning exited with {proc.returncode}; see {work}/finetune.log")
    return parse_round_result(out_path.read_text())
