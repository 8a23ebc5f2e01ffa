"""Fine-tuning rounds as the distill node runs them: persisted bookkeeping, the round in a
separate process (torch stays out of the node; a crashed or hung trainer cannot take the
node with it) and the locks that keep one node and one trainer per store. No torch import.

Process lifetime: the trainer runs in its own session (process group), so it is killed as a
group and a Ctrl-C in the node's terminal does not reach it half-way; on Linux it also gets
SIGKILL when the thread that started it dies (``PR_SET_PDEATHSIG``), so a SIGKILLed node
leaves no trainer behind. The trainer holds ``rounds/trainer.lock`` (``fcntl.flock``) while
it runs: a second trainer on the same store refuses to start, and a restarted node kills a
leftover one (``reap_trainer``) before it starts its own.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from depthkd_core.atomic import atomic_open

TRAINER_LOCK = "trainer.lock"
SUPERVISOR_LOCK = "supervisor.lock"
LOCKED_EXIT = 75  # the trainer's exit code when another trainer holds the lock (EX_TEMPFAIL)
PR_SET_PDEATHSIG = 1


class LockBusyError(RuntimeError):
    """Another process holds the lock; ``pid`` is the holder's, when it wrote one."""

    def __init__(self, path: Path, pid: int | None) -> None:
        super().__init__(f"{path} is held by another process (pid {pid})")
        self.path, self.pid = path, pid


def _read_pid(handle: IO[str]) -> int | None:
    handle.seek(0)
    text = handle.read().strip()
    return int(text) if text.isdigit() else None


def hold_lock(path: Path) -> IO[str]:
    """Take the exclusive ``flock`` on ``path`` and write our pid into it; LockBusyError if
    another process holds it. The lock lives as long as the returned handle (or the process:
    the kernel drops it when the holder dies, however it dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # the handle is the lock
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        pid = _read_pid(handle)
        handle.close()
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LockBusyError(path, pid) from None
        raise
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def reap_trainer(rounds_dir: Path, timeout_s: float = 10.0) -> int | None:
    """Kill a trainer left running on ``rounds_dir`` (its process group) and wait until its
    lock is free. Returns the pid killed, None when no trainer held the lock."""
    path = rounds_dir / TRAINER_LOCK
    try:
        hold_lock(path).close()
        return None
    except LockBusyError as busy:
        pid = busy.pid
    if pid is not None:
        try:  # the trainer leads its own process group: take its workers with it
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:  # started by hand, not as a group leader
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            hold_lock(path).close()
            return pid
        except LockBusyError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"a trainer (pid {pid}) still holds {path} after "
                                   f"{timeout_s:g} s") from None
            time.sleep(0.05)


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` (Linux) that makes the child get SIGKILL when its parent dies.

    ``prctl`` is resolved here, in the parent, so the forked child only makes the call.
    The kernel ties PDEATHSIG to the *thread* that forked: call Popen from a thread that
    outlives the child (the supervisor thread waits for it). The parent may die between
    fork and prctl: the child then already has another parent and exits.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class RoundState:
    """Round bookkeeping persisted atomically in ``path`` (state.json): resume on restart.

    base_model: the ONNX the depth node ran when this line of refinement began (rollback's
    last stop); base_version: the registry version then (versions up to it belong to an
    earlier base); init_checkpoint: where the next round starts ("" = the live model's own
    checkpoint); on_base: the depth node runs the base model; refused_in_a_row: rounds the
    gate refused since the last deploy (the next round's learning rate falls with it).
    """

    def __init__(self, path: Path) -> None:
        self.path, self._lock = path, threading.Lock()
        data = json.loads(path.read_text()) if path.is_file() else {}
        self.rounds: int = data.get("rounds", 0)
        self.trained_keys: set[str] = set(data.get("trained_keys", []))
        self.init_checkpoint: str = data.get("init_checkpoint", "")
        self.deployed_rounds: list[int] = data.get("deployed_rounds", [])
        self.last_loss: float | None = data.get("last_loss")
        self.last_gate: dict[str, Any] | None = data.get("last_gate")
        self.on_base: bool = data.get("on_base", True)
        self.base_model: str = data.get("base_model", "")
        self.base_version: int = data.get("base_version", 0)
        self.refused_in_a_row: int = data.get("refused_in_a_row", 0)

    def save(self) -> None:
        data = {"rounds": self.rounds, "trained_keys": sorted(self.trained_keys),
                "init_checkpoint": self.init_checkpoint, "deployed_rounds": self.deployed_rounds,
                "last_loss": self.last_loss, "last_gate": self.last_gate,
                "on_base": self.on_base, "base_model": self.base_model,
                "base_version": self.base_version, "refused_in_a_row": self.refused_in_a_row}
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


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_round_process(store: Path, init: str | Path, work: Path, config: str, timeout_s: float,
                      stop: threading.Event, extra: list[str] | None = None) -> dict[str, Any] | None:
    """``python -m depthkd_core.online.finetune`` on ``store`` from ``init`` in ``work``.

    The same ``work`` on a retry resumes the round. ``extra``: more arguments (the gate's
    ``--live``, ``--margin``, ``--export``). Returns its result line; None when ``stop`` was
    set (the process group is killed); RuntimeError on a timeout or a failure, whose output
    is in work/finetune.log. The trainer takes ``work.parent/trainer.lock``.
    """
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "depthkd_core.online.finetune", "--store", str(store),
           "--init", str(init), "--work", str(work), "--lock", str(work.parent / TRAINER_LOCK),
           *(extra or [])]
    if config:
        cmd += ["--config", config]
    out_path = work / "result.out"  # a file, not a pipe: a chatty trainer cannot block
    with open(out_path, "w") as out, open(work / "finetune.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=out, stderr=log, start_new_session=True,
                                preexec_fn=die_with_parent())  # see die_with_parent
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            if stop.wait(0.1) or time.monotonic() > deadline:
                _kill_group(proc)
                if stop.is_set():
                    return None
                raise RuntimeError(f"fine-tuning in {work} exceeded {timeout_s:g} s")
    if proc.returncode == LOCKED_EXIT:
        raise RuntimeError(f"another trainer holds {work.parent / TRAINER_LOCK}; not started")
    if proc.returncode != 0:
        raise RuntimeError(f"fine-tuning exited with {proc.returncode}; see {work}/finetune.log")
    return parse_round_result(out_path.read_text())
