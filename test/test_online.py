"""depthkd_core.online: keyframe selection, the crash-safe store, a fine-tuning round, the gate, the registry."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from depthkd_core.geometry import Intrinsics
from depthkd_core.models import ModelConfig, build_model, save_checkpoint
from depthkd_core.online import finetune
from depthkd_core.online.finetune import FinetuneConfig, export_candidate, run_round
from depthkd_core.online.gate import checkpoint_predictor, evaluate_against_teacher, gate
from depthkd_core.online.keyframes import (
    KeyframeSelector,
    KeyframeStore,
    StoreFullError,
)
from depthkd_core.online.registry import ModelRegistry
from depthkd_core.online.rounds import (
    LOCKED_EXIT,
    TRAINER_LOCK,
    LockBusyError,
    RoundState,
    hold_lock,
    parse_round_result,
    reap_trainer,
    run_round_process,
)
from depthkd_core.online.supervisor import (
    PushError,
    Supervisor,
    SupervisorConfig,
    checkpoint_for,
)

SIZE = 64
K = Intrinsics(fx=50.0, fy=50.0, cx=31.5, cy=31.5, width=SIZE, height=SIZE)


def _image(seed: int) -> np.ndarray:
    """A smooth random colour image (blobs), different per seed."""
    low = np.random.default_rng(seed).uniform(0, 255, (6, 6, 3)).astype(np.float32)
    return np.clip(cv2.resize(low, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)


def _teacher(rgb: np.ndarray) -> np.ndarray:
    """The synthetic metric teacher: depth = 1 + 4 * grey / 255 metres."""
    return (1.0 + 4.0 * cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0).astype(np.float32)


def _fill(root: Path, n: int, **kw) -> KeyframeStore:
    store = KeyframeStore(root, min_free_bytes=0, **kw)
    for i in range(n):
        rgb = _image(i)
        key = store.add(rgb, K, float(i))
        store.set_teacher_depth(key, _teacher(rgb))
    return store


# -- selector ---------------------------------------------------------------
def test_selector_interval_and_novelty() -> None:
    sel = KeyframeSelector(min_interval_s=1.0, novelty_threshold=0.08, history=4)
    a, b = _image(0), _image(1)
    assert sel.accept(a, 0.0)                       # first frame
    assert not sel.accept(b, 0.5)                   # too soon, even though new
    assert not sel.accept(a.copy(), 2.0)            # identical view: novelty 0
    assert sel.novelty(a) == 0.0
    assert sel.novelty(b) > 0.08
    assert sel.accept(b, 2.0)                       # new view after the interval
    assert not sel.accept(b, 5.0)                   # seen already
    assert sel.accept(_image(2), 5.0)
    assert sel.accept(_image(3), 1.0)               # clock went backwards: interval passes
    with pytest.raises(ValueError, match="uint8"):
        sel.accept(a.astype(np.float32), 9.0)


# -- store ------------------------------------------------------------------
def test_store_round_trip_and_restart(tmp_path: Path) -> None:
    store = KeyframeStore(tmp_path, min_free_bytes=0)
    rgb = _image(7)
    key = store.add(rgb, K, 12.5)
    assert key == "0000000000" and store.keys() == [key]
    frame = store.load(key)
    np.testing.assert_array_equal(frame.rgb, rgb)   # PNG is lossless
    assert frame.intrinsics == K and frame.depth is None and store.stamp(key) == 12.5
    assert store.pending_teacher() == [key] and store.teacher_depth(key) is None
    depth = np.random.default_rng(0).uniform(0.1, 5, (SIZE, SIZE)).astype(np.float32)
    store.set_teacher_depth(key, depth, is_inverse=True)
    np.testing.assert_array_equal(store.teacher_depth(key), depth)
    assert store.teacher_info(key) == {"is_inverse": True, "is_metric": False}
    assert store.pending_teacher() == []
    second = store.add(_image(8), K, 13.0)
    reopened = KeyframeStore(tmp_path, min_free_bytes=0)   # a restart
    assert reopened.keys() == [key, second]
    np.testing.assert_array_equal(reopened.teacher_depth(key), depth)
    assert reopened.add(_image(9), K, 14.0) == "0000000002"  # numbering continues
    with pytest.raises(FileNotFoundError, match="0000000099"):
        reopened.load("0000000099")
    with pytest.raises(ValueError, match="intrinsics"):
        reopened.add(np.zeros((32, 32, 3), np.uint8), K, 1.0)


def test_store_evicts_oldest_and_holdout_is_deterministic(tmp_path: Path) -> None:
    store = _fill(tmp_path, 8, max_frames=5, holdout_every=3)
    assert store.keys() == [f"{i:010d}" for i in range(3, 8)]
    assert not list(tmp_path.glob("0000000000*"))   # every file of an evicted key is gone
    assert store.holdout_keys() == ["0000000003", "0000000006"]
    assert store.train_keys() == ["0000000004", "0000000005", "0000000007"]
    again = KeyframeStore(tmp_path, max_frames=5, holdout_every=3, writer=False)
    assert again.holdout_keys() == store.holdout_keys()
    with pytest.raises(ValueError, match="read-only"):
        again.add(_image(0), K, 0.0)


def test_store_removes_stray_temp_and_uncommitted_files(tmp_path: Path) -> None:
    store = _fill(tmp_path, 2)
    (tmp_path / ".0000000002.png.abc.tmp").write_bytes(b"half")
    (tmp_path / "0000000002.png").write_bytes(b"png without its json")   # crash before the commit
    KeyframeStore(tmp_path, min_free_bytes=0, writer=False)              # a reader deletes nothing
    assert (tmp_path / ".0000000002.png.abc.tmp").exists()
    reopened = KeyframeStore(tmp_path, min_free_bytes=0)
    committed = store.keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{k}{s}" for k in committed for s in (".png", ".json", ".teacher.npy"))
    assert reopened.add(_image(5), K, 5.0) == "0000000002"


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_store_full_from_free_space_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _fill(tmp_path, 2)
    store.min_free_bytes = 10**6
    before = _files(tmp_path)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10**6 + 100))
    with pytest.raises(StoreFullError, match="min_free_bytes"):
        store.add(_image(3), K, 3.0)
    assert _files(tmp_path) == before
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10**9))
    assert store.add(_image(3), K, 3.0) == "0000000002"


def test_store_full_from_enospc_during_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _fill(tmp_path, 2)
    before = _files(tmp_path)
    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync(fd: int) -> None:   # the PNG commits, the JSON write hits a full disk
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StoreFullError) as info:
        store.add(_image(3), K, 3.0)
    assert info.value.errno == errno.ENOSPC and calls["n"] == 2
    assert _files(tmp_path) == before                 # no temp file, no orphan PNG
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert KeyframeStore(tmp_path, min_free_bytes=0).keys() == store.keys()


# -- fine-tuning round --------------------------------------------------------

ROUND = FinetuneConfig(steps_per_round=40, lr=1e-3, batch_size=4, height=SIZE, width=SIZE,
                       method_kwargs={"n_points": 256}, ckpt_every=10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 25-frame store with the synthetic teacher, a weak random student and one finished round."""
    root = tmp_path_factory.mktemp("online")
    store = _fill(root / "store", 25)
    torch.manual_seed(0)
    cfg = ModelConfig(encoder="mobilenetv2_050")
    init = save_checkpoint(root / "init.pt", build_model(cfg), cfg)
    result = run_round(root / "store", init, root / "round", ROUND)
    return {"root": root, "store": store, "init": init, "result": result}


def test_evaluate_against_teacher_hand_computed(tmp_path: Path) -> None:
    store = KeyframeStore(tmp_path, min_free_bytes=0)
    rgb = _image(1)
    depth = _teacher(rgb)
    key = store.add(rgb, K, 0.0)
    store.set_teacher_depth(key, depth)
    assert evaluate_against_teacher(lambda im: 1.1 * _teacher(im), store, [key]) == pytest.approx(0.1, rel=1e-5)
    store.set_teacher_depth(key, 3.0 * depth, is_inverse=False, is_metric=False)   # relative depth: median scale
    assert evaluate_against_teacher(_teacher, store, [key]) == pytest.approx(0.0, abs=1e-6)
    store.set_teacher_depth(key, 2.0 / depth + 0.1, is_inverse=True)                # disparity: lsq in 1/depth
    assert evaluate_against_teacher(_teacher, store, [key]) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="no keyframes with teacher depth"):
        evaluate_against_teacher(_teacher, store, [])


def test_run_round_improves_agreement_with_teacher(trained: dict) -> None:
    store, keys = trained["store"], trained["store"].holdout_keys()
    assert len(keys) == 5
    before = evaluate_against_teacher(checkpoint_predictor(trained["init"]), store, keys)
    result = trained["result"]
    after = evaluate_against_teacher(checkpoint_predictor(result.checkpoint), store, keys)
    assert result.steps == 40 and np.isfinite(result.loss)
    assert after < 0.6 * before, (before, after)
    snapshot = np.load(trained["root"] / "round" / finetune.SNAPSHOT)
    assert list(snapshot["keys"]) == store.train_keys()       # holdout frames never trained on


class _Killed(Exception):
    """Stands in for SIGKILL: the round stops between two optimiser steps."""


def test_run_round_resumes_after_interruption(trained: dict, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    root, calls = trained["root"], {"n": 0, "kill_at": 16}
    real_update = finetune.Trainer._update

    def update(self, batch):
        calls["n"] += 1
        if calls["n"] == calls["kill_at"]:
            raise _Killed("killed at step 16")
        return real_update(self, batch)

    monkeypatch.setattr(finetune.Trainer, "_update", update)
    work = tmp_path / "round"
    with pytest.raises(_Killed):
        run_round(root / "store", trained["init"], work, ROUND)
    assert [p.name for p in finetune.checkpoints(work)] == ["ckpt_0000010.pt"]
    assert not (work / finetune.DONE).exists()
    calls.update(n=0, kill_at=-1)
    resumed = run_round(root / "store", root / "missing_init.pt", work, ROUND)  # init not needed now
    assert calls["n"] == 30 and resumed.steps == 40
    want = torch.load(trained["result"].checkpoint, weights_only=True)["state_dict"]
    got = torch.load(resumed.checkpoint, weights_only=True)["state_dict"]
    for name, value in want.items():   # bit-exact with the uninterrupted round
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)
    calls["n"] = 0
    assert run_round(root / "store", trained["init"], work, ROUND) == resumed and calls["n"] == 0


def test_finetune_cli_and_bad_input(trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "round.yaml"
    config.write_text(f"height: {SIZE}\nwidth: {SIZE}\nbatch_size: 2\nmethod_kwargs: {{n_points: 64}}\n")
    root = trained["root"]
    assert finetune.main(["--store", str(root / "store"), "--init", str(trained["init"]),
                          "--work", str(tmp_path / "w"), "--config", str(config), "steps_per_round=2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 2 and Path(out["checkpoint"]).is_file()
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        run_round(root / "store", tmp_path / "nope.pt", tmp_path / "w2", ROUND)
    with pytest.raises(ValueError, match="tiekd"):
        FinetuneConfig(method="datafree")
    empty = KeyframeStore(tmp_path / "empty", min_free_bytes=0)
    empty.add(_image(0), K, 0.0)
    with pytest.raises(ValueError, match="at least batch_size"):
        run_round(empty.root, trained["init"], tmp_path / "w3", ROUND)


# -- gate and registry --------------------------------------------------------
def _onnx(ckpt: Path, path: Path) -> Path:
    assert export_candidate(ckpt, path, SIZE, SIZE) == ""
    return path


def test_an_int8_live_student_gets_an_int8_candidate(trained: dict, tmp_path: Path) -> None:
    from depthkd_core.export.contract import images_to_batch
    from depthkd_core.export.quantize import is_int8, quantize_int8

    store, result = trained["store"], trained["result"]
    frames = finetune.store_calibration(store, 8)
    assert len(frames) == 8 and all(f.shape == (SIZE, SIZE, 3) for f in frames)
    assert len(finetune.store_calibration(store, 1000)) == len(store.train_keys())
    fp32 = _onnx(trained["init"], tmp_path / "live_fp32.onnx")
    batch = images_to_batch(frames, SIZE, SIZE)
    live = tmp_path / "live.onnx"
    assert quantize_int8(fp32, live, batch, batch).passed and is_int8(live) and not is_int8(fp32)
    line = finetune.judge(store.root, result, tmp_path / "int8", live, 0.0, (SIZE, SIZE),
                          calibration_frames=8)
    assert line["int8"] and is_int8(line["onnx"]) and line["gate"]["candidate_abs_rel"] is not None
    line = finetune.judge(store.root, result, tmp_path / "fp32", fp32, 0.0, (SIZE, SIZE))
    assert not line["int8"] and not is_int8(line["onnx"])


def test_gate_deploys_better_refuses_worse_and_rollback(trained: dict) -> None:
    store, init, better = trained["store"], trained["init"], trained["result"].checkpoint
    root = trained["root"]
    weak, good = _onnx(init, root / "weak.onnx"), _onnx(better, root / "good.onnx")
    registry = ModelRegistry(root / "models")
    assert registry.current() is None and registry.previous() is None
    live = registry.publish(weak, init)
    assert live.name == "v0001.onnx" and registry.current() == live and registry.version() == 1
    assert live.with_suffix(".pt").read_bytes() == Path(init).read_bytes()  # X.onnx -> X.pt
    decision = gate(good, live, store, margin=0.05)
    assert decision.deploy and decision.candidate_abs_rel < decision.live_abs_rel - 0.05, decision.reason
    new = registry.publish(good, better)
    assert registry.publish(good, better) == new  # the same checkpoint again: not twice
    assert (registry.current(), registry.previous()) == (new, live) and new.name == "v0002.onnx"
    worse = gate(weak, new, store, margin=0.0)                 # the weak random student
    assert not worse.deploy and worse.candidate_abs_rel > worse.live_abs_rel
    same = gate(good, new, store, margin=1e-3)
    assert not same.deploy and abs(same.candidate_abs_rel - same.live_abs_rel) < 1e-6
    state = json.loads((registry.dir / "current.json").read_text())
    assert [e["file"] for e in state["stack"]] == ["v0001.onnx", "v0002.onnx"]
    assert registry.versions() == [1, 2]
    assert not [p for p in registry.dir.iterdir() if p.name.startswith(".")]   # no temp/staging left
    assert registry.rollback() == live
    assert registry.current() == live and registry.previous() is None and not new.exists()
    assert not new.with_suffix(".pt").exists()
    with pytest.raises(ValueError, match="no previous"):
        registry.rollback()
    with pytest.raises(ValueError, match="margin"):
        gate(good, live, store, margin=-1.0)


def test_gate_refuses_a_candidate_not_finite_on_real_frames(trained: dict, tmp_path: Path) -> None:
    """Held-out keyframes are real received frames; a model whose depth is NaN there is
    refused with a reason, and a live model that is NaN there loses to a finite one."""
    from helpers import write_linear_onnx

    store = trained["store"]
    nan = write_linear_onnx(tmp_path / "nan.onnx", 1.0, float("nan"))
    fine = write_linear_onnx(tmp_path / "fine.onnx", 4.0, 1.0)
    refused = gate(nan, fine, store, margin=0.0)
    assert not refused.deploy and "non-finite depth on held-out keyframe" in refused.reason
    rescued = gate(fine, nan, store, margin=0.02)
    assert rescued.deploy and rescued.live_abs_rel == float("inf")
    empty = KeyframeStore(tmp_path / "empty", min_free_bytes=0)
    empty.add(_image(0), K, 0.0)  # key 0: held out, but no teacher depth yet
    assert "no held-out keyframe" in gate(fine, nan, empty, margin=0.0).reason


def test_registry_versions_and_bounded_disk(trained: dict, tmp_path: Path) -> None:
    onnx = tmp_path / "c.onnx"
    onnx.write_bytes(b"onnx")
    registry = ModelRegistry(tmp_path / "models", keep=2)

    def publish(tag: int) -> Path:
        ckpt = tmp_path / f"c{tag}.pt"
        ckpt.write_bytes(f"pt {tag}".encode())
        return registry.publish(onnx, ckpt)

    first, second = publish(1), publish(2)
    assert second.name == "v0002.onnx" and second.with_suffix(".pt").read_bytes() == b"pt 2"
    assert registry.rollback() == first
    third = publish(3)
    assert third.name == "v0003.onnx" and registry.previous() == first   # numbers never reused
    fourth = publish(4)
    assert not first.exists() and not first.with_suffix(".pt").exists()  # keep=2 bounds the disk
    assert registry.previous() == third and registry.current() == fourth
    before = _files(registry.dir)
    with pytest.raises(FileNotFoundError):  # a vanished candidate: nothing published
        registry.publish(tmp_path / "gone.onnx", tmp_path / "gone.pt")
    assert _files(registry.dir) == before and registry.current() == fourth
    (registry.dir / ".staging").mkdir()  # a publish killed half-way
    assert ModelRegistry(registry.dir).current() == fourth and not (registry.dir / ".staging").exists()


def test_export_candidate_reports_parity_and_export_failures(trained: dict, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from depthkd_core.export import onnx_export

    outcome = {"passed": True, "raise": False}

    def fake_export(model, path, height, width):
        Path(path).write_bytes(b"onnx")          # the real exporter writes even when parity fails
        if outcome["raise"]:
            raise RuntimeError("exporter crashed")
        return _Report(outcome["passed"])

    monkeypatch.setattr(onnx_export, "export_onnx", fake_export)  # imported late
    outcome["passed"] = False
    assert "parity failed" in export_candidate(trained["init"], tmp_path / "a.onnx", SIZE, SIZE)
    outcome.update({"passed": True, "raise": True})
    assert "exporter crashed" in export_candidate(trained["init"], tmp_path / "a.onnx", SIZE, SIZE)
    assert list(tmp_path.iterdir()) == []  # nothing left behind


class _Report:
    def __init__(self, passed: bool) -> None:
        self.passed = passed

    def summary(self) -> str:
        return "parity FAIL" if not self.passed else "parity PASS"


def test_parse_round_result() -> None:
    out = "step 1 loss 0.5\n" + json.dumps({"checkpoint": "/w/c.pt", "steps": 3, "loss": 0.25})
    assert parse_round_result(out) == {"checkpoint": "/w/c.pt", "steps": 3, "loss": 0.25}
    with pytest.raises(RuntimeError, match="no result line"):
        parse_round_result("Traceback ...\n")


def test_round_process_failure_timeout_and_stop(tmp_path: Path) -> None:
    import threading

    stop = threading.Event()
    work = tmp_path / "round_0001"
    # no store there: the trainer exits non-zero and says why in its log
    with pytest.raises(RuntimeError, match="exited with"):
        run_round_process(tmp_path / "missing", tmp_path / "init.pt", work, "", 120.0, stop)
    assert (work / "finetune.log").read_text().strip()
    with pytest.raises(RuntimeError, match="exceeded 0.01 s"):
        run_round_process(tmp_path / "missing", tmp_path / "init.pt", work, "", 0.01, stop)
    stop.set()  # shutdown: killed, no error, no result
    assert run_round_process(tmp_path / "missing", tmp_path / "init.pt", work, "", 120.0, stop) is None


def test_round_state_persists(tmp_path: Path) -> None:
    state = RoundState(tmp_path / "state.json")
    assert (state.rounds, state.trained_keys, state.on_base) == (0, set(), True)
    state.rounds, state.trained_keys, state.deployed_rounds = 2, {"b", "a"}, [1]
    state.save()
    again = RoundState(tmp_path / "state.json")
    assert (again.rounds, again.trained_keys, again.deployed_rounds) == (2, {"a", "b"}, [1])
    assert not list(tmp_path.glob(".*"))  # no temp file left



# -- process lifetime: the trainer dies with its node, one trainer per store -------------
def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever reaps it here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _lock_pid(path: Path) -> int | None:
    text = path.read_text().strip() if path.is_file() else ""
    return int(text) if text.isdigit() else None


LONG_ROUND = "steps_per_round=100000"
PARENT = """
import sys, threading
from pathlib import Path
from depthkd_core.online.rounds import run_round_process
store, init, work, config = sys.argv[1:5]
run_round_process(Path(store), init, Path(work), config, 600.0, threading.Event(),
                  ["steps_per_round=100000"])
"""


def _round_config(tmp_path: Path) -> str:
    config = tmp_path / "round.yaml"
    config.write_text(f"height: {SIZE}\nwidth: {SIZE}\nbatch_size: 2\nmethod_kwargs: {{n_points: 64}}\n")
    return str(config)


def test_trainer_dies_with_the_process_that_started_it(trained: dict, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from helpers import wait_until

    work = tmp_path / "rounds" / "round_0001"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(trained["root"] / "store"),
                               str(trained["init"]), str(work), _round_config(tmp_path)])
    try:
        lock = tmp_path / "rounds" / TRAINER_LOCK
        trainer = wait_until(lambda: _lock_pid(lock), timeout=60, what="the trainer's lock")
        assert _running(trainer) and os.getpgid(trainer) == trainer  # its own process group
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        wait_until(lambda: not _running(trainer), timeout=10, what="the trainer to die with it")
        assert reap_trainer(tmp_path / "rounds") is None  # its lock went with it
    finally:
        parent.kill()


def test_one_trainer_per_store_and_a_leftover_is_reaped(trained: dict, tmp_path: Path) -> None:
    import subprocess
    import sys

    from helpers import wait_until

    rounds, config = tmp_path / "rounds", _round_config(tmp_path)
    args = [sys.executable, "-m", "depthkd_core.online.finetune", "--store",
            str(trained["root"] / "store"), "--init", str(trained["init"]), "--config", config,
            "--lock", str(rounds / TRAINER_LOCK)]
    # a trainer left behind (no parent to die with): its own session, like the node starts it
    leftover = subprocess.Popen([*args, "--work", str(rounds / "round_0001"), LONG_ROUND],
                                start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        pid = wait_until(lambda: _lock_pid(rounds / TRAINER_LOCK) == leftover.pid and leftover.pid,
                         timeout=60, what="the leftover trainer's lock")
        second = subprocess.run([*args, "--work", str(rounds / "round_0002")], capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == LOCKED_EXIT and "held by another process" in second.stderr
        assert not (rounds / "round_0002" / "round.json").exists()
        with pytest.raises(LockBusyError):
            hold_lock(rounds / TRAINER_LOCK)
        assert reap_trainer(rounds) == pid
        leftover.wait(timeout=10)
        assert not _running(pid)
        hold_lock(rounds / TRAINER_LOCK).close()  # free again
    finally:
        leftover.kill()


# -- the supervisor: what is live, rounds, deploy, rollback, without ROS ---------------
class FakeDepthNode:
    """What the supervisor sees of a depth node: its model, set_parameters calls."""

    def __init__(self, model: Path) -> None:
        self.model, self.calls, self.refuse = model, [], set()

    def push(self, model: Path) -> None:
        self.calls.append(model)
        if model.name in self.refuse:
            raise PushError(f"depth node rejected {model}: refused")
        self.model = model

    def read(self) -> Path:
        return self.model


class FakeRounds:
    """Stands in for the round process: records its init, answers the next gate verdict."""

    def __init__(self) -> None:
        self.inits: list[Path] = []
        self.lives: list[str] = []
        self.lr_scales: list[float] = []
        self.verdicts: list[tuple[bool, float, float]] = []

    def __call__(self, store, init, work, config, timeout, stop, extra):
        self.inits.append(Path(init))
        self.lives.append(extra[extra.index("--live") + 1])
        self.lr_scales.append(float(extra[extra.index("--lr-scale") + 1]))
        work.mkdir(parents=True, exist_ok=True)
        (work / "final.pt").write_text(f"weights of {work.name}")
        (work / "candidate.onnx").write_text(f"onnx of {work.name}")
        deploy, cand, live = self.verdicts.pop(0)
        return {"checkpoint": str(work / "final.pt"), "steps": 1, "loss": 0.5,
                "onnx": str(work / "candidate.onnx"),
                "gate": {"deploy": deploy, "live_abs_rel": live, "candidate_abs_rel": cand,
                         "margin": 0.01, "reason": "test"}}


def _labelled(store: KeyframeStore, n: int) -> None:
    for _ in range(n):
        rgb = _image(len(store.keys()) + 100)
        store.set_teacher_depth(store.add(rgb, K, 0.0), _teacher(rgb))


def _supervisor(root: Path, depth: FakeDepthNode, rounds: FakeRounds) -> Supervisor:
    sup = Supervisor(root, SupervisorConfig(min_new_keyframes=2, retry_pause_s=0.0),
                     depth.push, depth.read)
    sup.runner = rounds
    return sup


def test_supervisor_follows_the_depth_node_deploys_accumulates_and_rolls_back(tmp_path: Path) -> None:
    import threading

    mine = tmp_path / "my.onnx"
    mine.write_text("the user's model")
    (tmp_path / "my.pt").write_text("its checkpoint")
    root, depth, rounds, stop = tmp_path / "state", FakeDepthNode(mine), FakeRounds(), threading.Event()
    sup = _supervisor(root, depth, rounds)
    with pytest.raises(LockBusyError):  # one supervisor per store
        _supervisor(root, depth, rounds)
    store = KeyframeStore(root / "keyframes", min_free_bytes=0)
    sup.sync(at_start=True)
    assert sup.status()["live_model"] == str(mine) and sup.status()["deployed_version"] is None
    assert not sup.run_round(stop)  # nothing labelled yet
    # a worse candidate: the next round starts from the live checkpoint again
    _labelled(store, 2)
    rounds.verdicts = [(False, 0.5, 0.4), (False, 0.39, 0.4), (True, 0.3, 0.4), (True, 0.2, 0.3)]
    assert sup.run_round(stop) and rounds.inits[-1] == tmp_path / "my.pt"
    assert rounds.lives[-1] == str(mine)  # the gate judges against what the depth node runs
    _labelled(store, 2)
    assert sup.run_round(stop) and rounds.inits[-1] == tmp_path / "my.pt"
    # no worse than live, not better by the margin: the next round continues from it
    _labelled(store, 2)
    assert sup.run_round(stop) and rounds.inits[-1] == root / "rounds" / "round_0002" / "final.pt"
    v1 = root / "models" / "v0001.onnx"
    assert depth.model == v1 and v1.read_text() == "onnx of round_0003"
    _labelled(store, 2)
    assert sup.run_round(stop) and rounds.inits[-1] == v1.with_suffix(".pt")  # X.onnx -> X.pt
    v2 = root / "models" / "v0002.onnx"
    assert depth.model == v2 and sup.status()["deployed_version"] == "v0002"
    assert sup.counts.values["deploys"] == 2 and sup.status()["rounds_run"] == 4
    assert rounds.lr_scales == [1.0, 0.5, 0.25, 1.0]  # lowered by refusals, reset by a deploy
    # a restart with the depth node back on its launch file's model: the refined one returns
    sup.close()
    depth.model = mine
    sup = _supervisor(root, depth, rounds)
    sup.sync(at_start=True)
    assert depth.model == v2 and sup.status()["deployed_version"] == "v0002"
    # rollback restores what was live before, down to the user's model
    depth.refuse = {"v0001.onnx"}
    with pytest.raises(PushError):
        sup.rollback()
    assert depth.model == v2 and sup.registry.current() == v2  # refused: nothing changed
    depth.refuse = set()
    assert sup.rollback() == v1 and depth.model == v1
    assert sup.rollback() == mine and depth.model == mine
    assert sup.status()["deployed_version"] is None
    with pytest.raises(ValueError, match="no deployed model"):
        sup.rollback()
    assert sup.counts.values["rollbacks"] == 2
    sup.close()


def test_supervisor_adopts_a_model_set_by_hand_and_refuses_without_checkpoint(tmp_path: Path) -> None:
    import threading

    mine, other = tmp_path / "my.onnx", tmp_path / "other.onnx"
    for path in (mine, other, tmp_path / "my.pt"):
        path.write_text(path.name)
    root, depth, rounds = tmp_path / "state", FakeDepthNode(mine), FakeRounds()
    sup = _supervisor(root, depth, rounds)
    store = KeyframeStore(root / "keyframes", min_free_bytes=0)
    sup.sync(at_start=True)
    _labelled(store, 2)
    rounds.verdicts = [(True, 0.2, 0.3)]
    assert sup.run_round(threading.Event()) and depth.model.name == "v0001.onnx"
    depth.model = other  # the user sets their own model by hand
    _labelled(store, 2)
    assert not sup.run_round(threading.Event())
    status = sup.status()
    assert status["base_model"] == str(other) and status["deployed_version"] is None
    assert "no checkpoint for the live model" in status["training"] and "other.pt" in status["training"]
    with pytest.raises(ValueError, match="no deployed model"):
        sup.rollback()  # the user's model is the base now: nothing of ours to undo
    sup.close()


def test_checkpoint_for_by_name_or_provenance(tmp_path: Path) -> None:
    model = tmp_path / "student.onnx"
    assert checkpoint_for(model) is None
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "s.pt").write_text("w")
    (tmp_path / "student.json").write_text(json.dumps({"checkpoint": "weights/s.pt"}))
    assert checkpoint_for(model) == tmp_path / "weights" / "s.pt"
    (tmp_path / "student.pt").write_text("w")
    assert checkpoint_for(model) == tmp_path / "student.pt"
    (tmp_path / "x.json").write_text("[not an object")
    assert checkpoint_for(tmp_path / "x.onnx") is None
