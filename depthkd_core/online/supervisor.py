"""The on-robot refinement policy, without ROS: what is live, when a round runs, what the
gate decided, what gets deployed and what a rollback restores (docs/online.md).

The depth node's model is the one truth about what is live: the supervisor reads it
(``read_live``) at start and before every round, and finds the checkpoint to fine-tune by
convention (``checkpoint_for``: ``X.onnx`` -> ``X.pt``, or the ``checkpoint`` of a ``X.json``
provenance file). It changes it only through ``push``. A model the supervisor did not put
there (the user's, at the first start or set by hand later) becomes the *base*: the line of
refinement starts again from it and a rollback past the first deploy returns to it.

Every state change (sync, round result, deploy, rollback) runs under one lock; the status
reads files and plain attributes and never waits for it (a ``push`` holds the lock while
the depth node answers, and the status may be asked for on the thread that carries that
answer). One supervisor per store (``supervisor.lock``), one trainer per store
(``rounds/trainer.lock``); a trainer left by a killed node is killed at start.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from depthkd_core.online.keyframes import KeyframeStore
from depthkd_core.online.registry import ModelRegistry
from depthkd_core.online.rounds import (
    SUPERVISOR_LOCK,
    RoundState,
    hold_lock,
    reap_trainer,
    run_round_process,
)

SUPERVISOR_COUNTERS = ("deploys", "deploy_rejected", "rollbacks", "round_failures")


@dataclass(frozen=True)
class SupervisorConfig:
    """min_new_keyframes: teacher-labelled keyframes new since the last round that start one.
    gate_margin: AbsRel the candidate must beat the live model by. export_height/width: the
    candidate's ONNX size (a student with a fixed input size keeps its own).
    round_timeout_s: a longer round is killed. finetune_config: FinetuneConfig YAML ("" =
    defaults). retry_pause_s: pause after a failed round or an unreachable depth node.
    refused_lr_decay: each round the gate refused in a row multiplies the next round's
    learning rate by this, down to min_lr_scale of the config's (1 = never lowered)."""

    min_new_keyframes: int = 20
    gate_margin: float = 0.02
    export_height: int = 192
    export_width: int = 256
    round_timeout_s: float = 3600.0
    finetune_config: str = ""
    retry_pause_s: float = 5.0
    refused_lr_decay: float = 0.5
    min_lr_scale: float = 0.125

    def lr_scale(self, refused_in_a_row: int) -> float:
        return max(self.min_lr_scale, self.refused_lr_decay ** refused_in_a_row)


class PushError(RuntimeError):
    """The depth node refused the model (its reason) or did not answer."""


class Counters:
    """Thread-safe event counters and the last error message, shared by node and supervisor."""

    def __init__(self, *keys: str) -> None:
        self._lock = threading.Lock()
        self.values = dict.fromkeys(keys, 0)
        self.last_error = ""

    def add(self, key: str, error: str = "") -> None:
        with self._lock:
            self.values[key] += 1
            self.last_error = error or self.last_error

    def error(self, message: str) -> None:
        with self._lock:
            self.last_error = message

    def snapshot(self) -> tuple[dict[str, int], str]:
        with self._lock:
            return dict(self.values), self.last_error


def checkpoint_for(model: Path) -> Path | None:
    """The torch checkpoint ``model`` (ONNX) was exported from: ``X.pt`` beside ``X.onnx``,
    else the ``checkpoint`` entry of a ``X.json`` provenance file beside it (relative to the
    JSON's folder); None when neither names an existing file."""
    beside = model.with_suffix(".pt")
    if beside.is_file():
        return beside
    provenance = model.with_suffix(".json")
    try:
        named = json.loads(provenance.read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return None
    path = provenance.parent / named if isinstance(named, str) and named else None
    return path if path is not None and path.is_file() else None


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class Supervisor:
    """The refinement policy on ``root`` (keyframes/, rounds/, models/, state.json).

    push(model): make the depth node run ``model`` (PushError with its reason if not).
    read_live(): the model file the depth node runs now (an error when it cannot be read).
    """

    runner = staticmethod(run_round_process)  # the round's process (a benchmark wraps it)

    def __init__(self, root: str | Path, cfg: SupervisorConfig, push: Callable[[Path], None],
                 read_live: Callable[[], Path], counters: Counters | None = None,
                 log: Any = None) -> None:
        self.root, self.cfg = Path(root), cfg
        self.root.mkdir(parents=True, exist_ok=True)
        self._held = hold_lock(self.root / SUPERVISOR_LOCK)  # LockBusyError: a second node
        try:
            (self.root / "keyframes").mkdir(exist_ok=True)
            self.store = KeyframeStore(self.root / "keyframes", writer=False)
            self.state = RoundState(self.root / "state.json")
            self.registry = ModelRegistry(self.root / "models")  # removes a stale .staging
            self.reaped = reap_trainer(self.root / "rounds")
        except BaseException:
            self._held.close()
            raise
        self._push_fn, self._read_live = push, read_live
        self.counts = counters or Counters(*SUPERVISOR_COUNTERS)
        self.log = log or logging.getLogger(__name__)
        self._lock = threading.RLock()
        self.live: Path | None = None  # what the depth node runs, as last read or pushed
        self.training = ""  # why no round can start ("" = rounds run when due)
        if self.reaped is not None:
            self.log.warning(f"killed trainer {self.reaped} left by an earlier run")

    def close(self) -> None:
        self._held.close()

    # -- what is live -------------------------------------------------------------------
    def expected_live(self) -> Path | None:
        """The model the depth node should run: the registry's current, or the base."""
        st = self.state
        if st.on_base:
            return Path(st.base_model) if st.base_model else None
        return self.registry.current()

    def sync(self, at_start: bool = False) -> Path:
        """Read what the depth node runs and reconcile the state with it; returns it.

        At start, a depth node back on the base (its launch file's model) while a refined
        version is current gets that version pushed again: refinement survives a reboot.
        """
        observed = self._read_live().resolve()
        with self._lock:
            st, expected = self.state, self.expected_live()
            if expected is not None and observed == expected.resolve():
                self.live = observed
                return observed
            if st.base_model and observed == Path(st.base_model).resolve():
                if at_start and expected is not None and self._push(expected):
                    return expected
                st.on_base = True  # set back to the base by hand (or the re-push failed)
            else:
                self.log.info(f"the depth node runs {observed}: refinement starts from it")
                st.base_model, st.base_version = str(observed), self.registry.version() or 0
                st.on_base, st.trained_keys = True, set()
            st.init_checkpoint = ""
            st.save()
            self.live = observed
            return observed

    def _push(self, model: Path) -> bool:
        try:
            self._push_fn(model)
        except PushError as exc:
            self.counts.add("deploy_rejected", str(exc))
            self.log.error(str(exc))
            return False
        self.live = model.resolve()
        self.log.info(f"depth node now runs {model}")
        return True

    # -- rounds -------------------------------------------------------------------------
    def due(self) -> set[str] | None:
        """The labelled keys when enough of them are new since the last round, else None."""
        labelled = set(self.store.keys()) - set(self.store.pending_teacher())
        new = len(labelled - self.state.trained_keys)
        return labelled if new >= self.cfg.min_new_keyframes else None

    def run_round(self, stop: threading.Event) -> bool:
        """When due: fine-tune (child process: train, export, gate), then deploy or not.
        False when not due, not possible (reason in ``training``) or stopped."""
        labelled = self.due()
        if labelled is None:
            return False
        live = self.sync()
        init = Path(self.state.init_checkpoint) if self.state.init_checkpoint \
            else checkpoint_for(live)
        if init is None:
            reason = (f"no checkpoint for the live model {live} (neither "
                      f"{live.with_suffix('.pt').name} nor a 'checkpoint' in "
                      f"{live.with_suffix('.json').name} beside it): collecting and "
                      f"labelling only")
            if reason != self.training:  # once, not every retry
                self.log.error(reason)
            self.training = reason
            stop.wait(self.cfg.retry_pause_s)
            return False
        self.training = ""
        round_id = self.state.rounds + 1
        cfg = self.cfg
        scale = cfg.lr_scale(self.state.refused_in_a_row)
        self.log.info(f"round {round_id}: fine-tuning from {init} (learning rate x{scale:g})")
        result = self.runner(self.root / "keyframes", init,
                             self.root / "rounds" / f"round_{round_id:04d}", cfg.finetune_config,
                             cfg.round_timeout_s, stop,
                             ["--live", str(live), "--margin", str(cfg.gate_margin),
                              "--export", str(cfg.export_height), str(cfg.export_width),
                              "--lr-scale", str(scale)])
        if result is None:
            return False  # stopped: the round resumes at the next start
        self._finish(round_id, result, labelled, live)
        return True

    def _finish(self, round_id: int, result: dict[str, Any], labelled: set[str],
                live: Path) -> None:
        with self._lock:
            st = self.state
            gate = dict(result["gate"])
            self.log.info(f"round {round_id} gate: {gate['reason']}")
            if gate["deploy"] and round_id not in st.deployed_rounds:
                expected = self.expected_live()
                if expected is None or expected.resolve() != live:
                    gate.update(deploy=False, reason=f"{gate['reason']}; not deployed: the "
                                f"live model changed during the round")
                else:
                    path = self.registry.publish(result["onnx"], result["checkpoint"])
                    st.deployed_rounds.append(round_id)
                    st.on_base, st.init_checkpoint, st.refused_in_a_row = False, "", 0
                    st.last_loss, st.last_gate = float(result["loss"]), gate
                    st.save()  # before the push: a crash now must not deploy this round again
                    self.counts.add("deploys")
                    self._push(path)
            if not gate["deploy"]:
                # Progress accumulates: a candidate no worse than live is where the next
                # round continues; only a worse one sends it back to the live checkpoint.
                # Refused rounds in a row lower the learning rate: short rounds at a rate
                # that adapted a fresh model overshoot one that is already close.
                cand, base = _finite(gate.get("candidate_abs_rel")), _finite(gate.get("live_abs_rel"))
                keep = cand is not None and (base is None or cand <= base)
                st.init_checkpoint = str(result["checkpoint"]) if keep else ""
                st.refused_in_a_row += 1
            st.last_loss, st.last_gate = float(result["loss"]), gate
            st.rounds, st.trained_keys = round_id, labelled
            st.save()

    def run(self, stop: threading.Event) -> None:
        """The supervisor thread: read what is live (until the depth node answers), then
        start rounds when due; a failed round is counted and retried after a pause."""
        while not stop.is_set():
            try:
                self.sync(at_start=True)
                break
            except Exception as exc:  # the depth node is not up yet
                if stop.is_set():
                    return
                self.counts.error(f"cannot read the depth node's model: {exc}")
                self.log.warning(f"cannot read the depth node's model: {exc}")
                stop.wait(self.cfg.retry_pause_s)
        while not stop.wait(0.5):
            try:
                self.run_round(stop)
            except Exception as exc:  # a failed round is retried later
                self.counts.add("round_failures", f"round failed: {exc}")
                self.log.error(f"fine-tuning round failed: {exc}")
                stop.wait(self.cfg.retry_pause_s)

    # -- rollback and status ------------------------------------------------------------
    def rollback(self) -> Path:
        """Push what was live before the current deploy (the previous version, or the base
        after the first deploy); ValueError when nothing was deployed, PushError when the
        depth node refuses it (then nothing changes)."""
        with self._lock:
            st = self.state
            if st.on_base or self.registry.current() is None:
                raise ValueError("no deployed model to roll back from")
            versions = self.registry.versions()
            to_base = len(versions) < 2 or versions[-2] <= st.base_version
            target = Path(st.base_model) if to_base else self.registry.previous()
            self._push_fn(target)
            if to_base:  # every version so far is past: the next rollback stops at the base
                st.base_version = versions[-1]
            else:
                self.registry.rollback()
            st.on_base, st.init_checkpoint = to_base, ""
            st.save()
            self.live = target.resolve()
            self.counts.add("rollbacks")
            self.log.info(f"rolled back: depth node now runs {target}")
            return target

    def status(self) -> dict[str, Any]:
        st = self.state
        current = None if st.on_base else self.registry.current()
        return {"rounds_run": st.rounds, "last_loss": st.last_loss, "last_gate": st.last_gate,
                "deployed_version": current.stem if current else None,
                "live_model": str(self.live) if self.live else None,
                "base_model": st.base_model or None, "training": self.training}
