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
from depthkd_core.online.finetune import FinetuneConfig, run_round
from depthkd_core.online.gate import checkpoint_predictor, evaluate_against_teacher, gate
from depthkd_core.online.keyframes import (
    KeyframeSelector,
    KeyframeStore,
    StoreFullError,
)
from depthkd_core.online.registry import DeployError, ModelRegistry
from depthkd_core.online.rounds import RoundState, parse_round_result, run_round_process

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
def test_gate_deploys_better_refuses_worse_and_rollback(trained: dict) -> None:
    store, init, better = trained["store"], trained["init"], trained["result"].checkpoint
    registry = ModelRegistry(trained["root"] / "models")
    assert registry.current() is None and registry.previous() is None
    live = registry.deploy(init, SIZE, SIZE)
    assert live.name == "v0001.onnx" and registry.current() == live and registry.version() == 1
    decision = gate(better, live, store, margin=0.05)
    assert decision.deploy and decision.candidate_abs_rel < decision.live_abs_rel - 0.05, decision.reason
    new = registry.deploy(better, SIZE, SIZE)
    assert (registry.current(), registry.previous()) == (new, live) and new.name == "v0002.onnx"
    worse = gate(init, new, store, margin=0.0)                 # the weak random student
    assert not worse.deploy and worse.candidate_abs_rel > worse.live_abs_rel
    same = gate(better, new, store, margin=1e-3)               # torch and ONNX of one model agree
    assert not same.deploy and abs(same.candidate_abs_rel - same.live_abs_rel) < 1e-3
    state = json.loads((registry.dir / "current.json").read_text())
    assert [e["file"] for e in state["stack"]] == ["v0001.onnx", "v0002.onnx"]
    assert not [p for p in registry.dir.iterdir() if p.name.startswith(".")]   # no temp/staging left
    assert registry.rollback() == live
    assert registry.current() == live and registry.previous() is None and not new.exists()
    with pytest.raises(ValueError, match="no previous"):
        registry.rollback()
    with pytest.raises(ValueError, match="margin"):
        gate(better, live, store, margin=-1.0)


class _Report:
    def __init__(self, passed: bool) -> None:
        self.passed = passed

    def summary(self) -> str:
        return "parity FAIL" if not self.passed else "parity PASS"


def test_registry_versions_and_export_failure(trained: dict, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from depthkd_core.export import onnx_export

    outcome = {"passed": True, "raise": False}

    def fake_export(model, path, height, width):
        Path(path).write_bytes(b"onnx")          # the real exporter writes even when parity fails
        if outcome["raise"]:
            raise RuntimeError("exporter crashed")
        return _Report(outcome["passed"])

    monkeypatch.setattr(onnx_export, "export_onnx", fake_export)  # deploy imports it late
    registry = ModelRegistry(tmp_path / "models", keep=2)
    first = registry.deploy(trained["init"], SIZE, SIZE)
    assert registry.deploy(trained["init"], SIZE, SIZE).name == "v0002.onnx"
    assert registry.rollback() == first
    third = registry.deploy(trained["init"], SIZE, SIZE)
    assert third.name == "v0003.onnx" and registry.previous() == first   # numbers never reused
    fourth = registry.deploy(trained["init"], SIZE, SIZE)
    assert not first.exists() and registry.previous() == third          # keep=2 bounds the disk
    before = _files(registry.dir)
    for passed, crash in ((False, False), (True, True)):
        outcome.update({"passed": passed, "raise": crash})
        with pytest.raises(DeployError):
            registry.deploy(trained["init"], SIZE, SIZE)
        assert _files(registry.dir) == before and registry.current() == fourth
    (registry.dir / ".staging").mkdir()
    assert ModelRegistry(registry.dir).current() == fourth and not (registry.dir / ".staging").exists()


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
    assert (state.rounds, state.trained_keys, state.on_base) == (0, set(), False)
    state.rounds, state.trained_keys, state.deployed_rounds = 2, {"b", "a"}, [1]
    state.save()
    again = RoundState(tmp_path / "state.json")
    assert (again.rounds, again.trained_keys, again.deployed_rounds) == (2, {"a", "b"}, [1])
    assert not list(tmp_path.glob(".*"))  # no temp file left

