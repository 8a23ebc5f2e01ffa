"""distill_node's acceptance test (collect -> label -> fine-tune -> gate -> hot-swap into the
real depth node) and the node as a process killed with SIGKILL, over real DDS with a real
teacher server on 127.0.0.1 (harness: distill_harness.py)."""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.ros

import torch
from distill_harness import (  # fixtures ros, teacher_url: conftest's pytest_plugins
    QOS,
    TOKEN,
    Camera,
    FakeDepthNode,
    H,
    Ros,
    W,
    camera_info,
    distill_process,
    frame,
    latest_status,
    token_file,
    wait_until,
    weak_student,
)
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image

from depthkd_core.models.teacher_base import Teacher
import helpers
from helpers import ros_domain
from depthkd_core.online.keyframes import KeyframeStore
from depthkd_core.serving.server import create_app
from depthkd_core.serving.transport import BackgroundServer
from depthkd_ros.conversions import rgb_to_image
from depthkd_ros.depth_node import DepthNode

DOMAIN_ID, E2E_DOMAIN_ID = ros_domain(58), ros_domain(59)  # one per module / context, so parallel runs never cross


class DomainTeacher(Teacher):
    """The 'new domain' the student never saw: depth = 2 + red (m), metric."""

    name = "domain"
    input_size = (H, W)

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        return 2.0 + images[:, :1]


def _abs_rel(depth: np.ndarray, rgb: np.ndarray) -> float:
    teacher = 2.0 + rgb[..., 0].astype(np.float32) / 255.0
    valid = np.isfinite(depth)
    return float(np.mean(np.abs(depth[valid] - teacher[valid]) / teacher[valid]))


def _live_abs_rel(camera: Camera, depth_msgs: list[Image], seeds: range) -> float:
    """Mean AbsRel of the real depth node's published depth vs the teacher on ``seeds``."""
    from depthkd_ros.conversions import depth_image_to_numpy

    scores = []
    for seed in seeds:
        camera.seq += 1
        msg = rgb_to_image(frame(seed))
        msg.header.stamp.sec = 1000 + camera.seq
        stamp = msg.header.stamp.sec

        def got(m: Image = msg, s: int = stamp) -> Image | None:
            camera.info.publish(camera_info(m.header))
            camera.image.publish(m)
            return next((d for d in depth_msgs if d.header.stamp.sec == s), None)

        scores.append(_abs_rel(depth_image_to_numpy(wait_until(got, what="depth")), frame(seed)))
    return float(np.mean(scores))


# The acceptance test of the on-robot loop: kept in the default suite (~45 s on 2 cores).
def test_end_to_end_collect_label_finetune_gate_hot_swap(tmp_path: Path) -> None:
    """Weak student live; frames from an unseen domain; the distill node labels, fine-tunes
    in a separate process, gates and hot-swaps; the live output then agrees with the teacher
    by a margin. A restart resumes without deploying the same round twice."""
    from depthkd_core.online.registry import ModelRegistry

    ckpt, live = weak_student(tmp_path)
    config = tmp_path / "round.yaml"
    config.write_text("method: labelfree\nsteps_per_round: 40\nlr: 0.003\nbatch_size: 4\n"
                      "height: 64\nwidth: 64\nckpt_every: 20\n"
                      "method_kwargs: {w_cwd: 1.0, w_geo: 1.0, w_mse: 1.0, n_points: 256}\n")
    ros = Ros(E2E_DOMAIN_ID)  # its own domain: nothing else sees these nodes
    try:
        depth = ros.add(DepthNode(context=ros.context, namespace="e2e",
                                  parameter_overrides=[Parameter("model_path", value=str(live))]))
        cam = ros.camera("e2e")
        depth_msgs: list[Image] = []
        cam.node.create_subscription(Image, "depth", depth_msgs.append, QOS)
        wait_until(lambda: depth._pubs["depth"].get_subscription_count(), what="depth sub")
        held_out = range(100, 103)
        before = _live_abs_rel(cam, depth_msgs, held_out)
        with BackgroundServer(create_app(DomainTeacher(), "domain", token=TOKEN)) as url:
            # nothing tells the distill node what is live but the depth node's model_path
            params = dict(teacher_url=url, model_name="domain", token_file=token_file(tmp_path),
                          finetune_config=str(config), min_new_keyframes=12, gate_margin=0.1,
                          export_height=64, export_width=64)
            node = ros.distill("e2e", tmp_path / "state", **params)
            cam.stream(node, range(12))
            wait_until(lambda: node.counts["deploys"] == 1 or node.counts["round_failures"],
                       timeout=240, what="a deploy")
            assert node.counts["round_failures"] == 0, node.last_error
            registry = ModelRegistry(tmp_path / "state" / "models")
            wait_until(lambda: depth.get_parameter("model_path").value == str(registry.current()),
                       what="hot-swap")
            status = wait_until(lambda: (s := node.status())["rounds_run"] == 1 and s,
                                what="round bookkeeping")
            assert status["deployed_version"] == "v0001" and status["last_loss"] > 0
            assert status["base_model"] == str(live)  # the user's model, read from the depth node
            assert registry.current().with_suffix(".pt").is_file()
            gate = status["last_gate"]
            assert gate["deploy"] and gate["candidate_abs_rel"] < gate["live_abs_rel"] - 0.1
            after = _live_abs_rel(cam, depth_msgs, held_out)
            assert after < before - 0.1, (before, after)
            # The held-out frames reach the distill node too; its store is written off the
            # executor, so the last one can still be in flight when the depth came back.
            wait_until(lambda: node.status()["frames_stored"] == 15, what="15 frames stored")
            ros.executor.remove_node(node)
            node.destroy_node()
            ros.nodes.remove(node)
            again = ros.distill("e2e", tmp_path / "state", **params)
            # 12 streamed + the 3 held-out frames sent after the swap (same camera topics)
            assert again.status()["rounds_run"] == 1 and again.status()["frames_stored"] == 15
            wait_until(lambda: again.status()["live_model"] == str(registry.current()),
                       what="the restart to read the live model")
            assert registry.version() == 1 and again.counts["deploys"] == 0
            # rollback restores what was live before: the user's model, not a packaged one
            again.set_parameters([Parameter("rollback", value=True)])
            wait_until(lambda: depth.get_parameter("model_path").value == str(live),
                       what="the user's model back")
            # the depth node switches first; the supervisor's bookkeeping follows under its lock
            wait_until(lambda: again.counts["rollbacks"] == 1, what="the rollback recorded")
            assert again.status()["deployed_version"] is None
    finally:
        ros.close()


def test_distill_node_sigkilled_restarts_with_the_store_intact(
        ros: Ros, teacher_url: str, tmp_path: Path) -> None:
    import signal

    store_dir, cam = tmp_path / "state", ros.camera("sigkill")
    proc = distill_process(DOMAIN_ID, "sigkill", store_dir, teacher_url, tmp_path / "first.log")
    try:
        wait_until(lambda: cam.image.get_subscription_count(), timeout=30.0, what="discovery")
        for seed in range(4):  # each frame until the status shows it stored (discovery races)
            latest_status(cam, proc, lambda s, n=seed + 1, k=seed: cam.send(frame(k)) or
                           (s["frames_stored"] >= n and s["pending_teacher"] == 0), f"frame {seed}")
        cam.send(frame(4))  # in flight when the kill lands: stored or not, never half
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    store = KeyframeStore(store_dir / "keyframes", writer=False)
    keys = store.keys()
    assert len(keys) in (4, 5)
    cam.status.clear()
    again = distill_process(DOMAIN_ID, "sigkill", store_dir, teacher_url, tmp_path / "second.log")
    try:
        status = latest_status(cam, again, lambda s: s["pending_teacher"] == 0, "restart")
        assert status["frames_stored"] == len(keys) and status["deploys"] == 0
        assert status["rounds_run"] == 0 and status["deployed_version"] is None
        assert KeyframeStore(store_dir / "keyframes", writer=False).keys() == keys
        for key, seed in zip(keys, range(5)):  # readable, unchanged, labelled
            np.testing.assert_array_equal(store.load(key).rgb, frame(seed))
            assert store.teacher_depth(key).shape == (H, W)
    finally:
        again.send_signal(2)
        again.wait(timeout=15)


@pytest.mark.slow  # ~60 s: a real round (fine-tuning process, ONNX export) before and after
def test_sigkill_right_after_a_deploy_never_deploys_that_round_again(
        ros: Ros, teacher_url: str, tmp_path: Path) -> None:
    import signal

    from depthkd_core.online.registry import ModelRegistry

    ckpt, live = weak_student(tmp_path)
    config = tmp_path / "round.yaml"
    config.write_text("method: labelfree\nsteps_per_round: 10\nlr: 0.003\nbatch_size: 4\n"
                      "height: 64\nwidth: 64\nckpt_every: 5\n")
    depth = ros.add(FakeDepthNode(ros.context, "sk2", model=live))
    store_dir, cam = tmp_path / "state", ros.camera("sk2")
    extra = {"finetune_config": config, "min_new_keyframes": 8, "gate_margin": 0.0,
             "export_height": 64, "export_width": 64}
    proc = distill_process(DOMAIN_ID, "sk2", store_dir, teacher_url, tmp_path / "first.log", **extra)
    try:
        wait_until(lambda: cam.image.get_subscription_count(), timeout=30.0, what="discovery")
        for seed in range(10):
            latest_status(cam, proc, lambda s, n=seed + 1, k=seed: cam.send(frame(k)) or
                           s["frames_stored"] >= n, f"frame {seed}")
        wait_until(lambda: depth.calls, timeout=120.0, what="the first deploy's push")
        proc.send_signal(signal.SIGKILL)  # at once: state.json may still say rounds = 0
        proc.wait(timeout=10)
    finally:
        proc.kill()
    registry = ModelRegistry(store_dir / "models")
    assert registry.version() == 1 and depth.calls == [str(registry.current())]
    state = json.loads((store_dir / "state.json").read_text())
    assert state["deployed_rounds"] == [1]
    # The kill lands within ms of the push, usually after the round's bookkeeping; put the
    # state back to the crash window between the deploy record and the round record.
    state.update(rounds=0, trained_keys=[])
    (store_dir / "state.json").write_text(json.dumps(state))
    cam.status.clear()
    again = distill_process(DOMAIN_ID, "sk2", store_dir, teacher_url, tmp_path / "second.log", **extra)
    try:
        latest_status(cam, again, lambda s: s["rounds_run"] == 1 and s["deployed_version"]
                       == "v0001", "round 1 settled")
        status = latest_status(cam, again, lambda s: True, "a later status")
        assert status["deploys"] == 0 and status["deployed_version"] == "v0001"
        assert registry.version() == 1  # round 1 re-ran but was not published or deployed twice
        log = (tmp_path / "second.log").read_text()
        assert "round 1: fine-tuning" in log
        assert set(depth.calls) == {str(registry.current())}
    finally:
        again.send_signal(2)
        again.wait(timeout=15)


# -- process lifetime: kills, Ctrl-C, restarts ---------------------------------------------
def _trainers(store_dir: Path) -> list[int]:
    """Running (not zombie) fine-tuning processes on ``store_dir``, found in /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and b"depthkd_core.online.finetune" in cmd \
                and str(store_dir / "keyframes").encode() in cmd:
            found.append(int(entry.name))
    return found


def _round_config(tmp_path: Path, steps: int) -> Path:
    config = tmp_path / "round.yaml"
    config.write_text(f"method: labelfree\nsteps_per_round: {steps}\nlr: 0.003\nbatch_size: 4\n"
                      "height: 64\nwidth: 64\nckpt_every: 5\nmethod_kwargs: {n_points: 256}\n")
    return config


def _extra(tmp_path: Path, steps: int) -> dict:
    # 5: a batch of 4 train keyframes beside the first held-out one
    return {"finetune_config": _round_config(tmp_path, steps), "min_new_keyframes": 5,
            "gate_margin": 0.0, "export_height": 64, "export_width": 64}


def _feed(cam: Camera, proc, seeds: range) -> None:
    """Each frame until the node's status shows it stored and labelled (discovery races)."""
    wait_until(lambda: cam.image.get_subscription_count(), timeout=30.0, what="discovery")
    for seed in seeds:
        latest_status(cam, proc, lambda s, k=seed: cam.send(frame(k)) or (
            s["keyframes"] >= 1 and s["frames_stored"] >= k + 1 and s["pending_teacher"] == 0),
            f"frame {seed}")


def test_sigkill_during_a_round_leaves_no_trainer_and_a_restart_runs_one(
        ros: Ros, teacher_url: str, tmp_path: Path) -> None:
    _, live = weak_student(tmp_path)
    ros.add(FakeDepthNode(ros.context, "skr", model=live))
    store_dir, cam = tmp_path / "state", ros.camera("skr")
    extra = _extra(tmp_path, 100000)  # a round that outlasts the test
    proc = distill_process(DOMAIN_ID, "skr", store_dir, teacher_url, tmp_path / "first.log", **extra)
    try:
        _feed(cam, proc, range(5))
        first = wait_until(lambda: _trainers(store_dir), timeout=60.0, what="a trainer")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    wait_until(lambda: not _trainers(store_dir), timeout=10.0,
               what=f"trainer {first} to die with its node")
    cam.status.clear()
    again = distill_process(DOMAIN_ID, "skr", store_dir, teacher_url, tmp_path / "second.log",
                            **extra)
    try:
        wait_until(lambda: _trainers(store_dir), timeout=60.0, what="the round to resume")
        latest_status(cam, again, lambda s: True, "the restarted node's status")
        assert len(_trainers(store_dir)) == 1
        log = (tmp_path / "second.log").read_text()
        assert "round 1: fine-tuning" in log  # the unfinished round, not a second one
        assert not (store_dir / "rounds" / "round_0002").exists()
    finally:
        again.send_signal(signal.SIGINT)
        again.wait(timeout=15)
    assert again.returncode == 0
    wait_until(lambda: not _trainers(store_dir), timeout=10.0, what="no trainer after Ctrl-C")


@pytest.mark.slow  # ~2 min: two node starts, a round, two exports
def test_ctrl_c_during_gate_and_export_exits_cleanly_and_the_round_resumes(
        ros: Ros, teacher_url: str, tmp_path: Path) -> None:
    from depthkd_core.online.registry import ModelRegistry

    _, live = weak_student(tmp_path)
    depth = ros.add(FakeDepthNode(ros.context, "cc", model=live))
    store_dir, cam = tmp_path / "state", ros.camera("cc")
    extra = _extra(tmp_path, 10)
    proc = distill_process(DOMAIN_ID, "cc", store_dir, teacher_url, tmp_path / "first.log", **extra)
    try:
        _feed(cam, proc, range(5))
        work = store_dir / "rounds" / "round_0001"
        wait_until(lambda: (work / "round.json").is_file(), timeout=120.0,
                   what="the round's training to finish")
        # then the candidate is exported (and gated): its temp file, or (a node exporting
        # itself) the registry's staging folder, exists. A quick export can slip between
        # two looks: the Ctrl-C then lands during the gate or the deploy, as good a moment.
        try:
            helpers.wait_until(lambda: any(work.glob(".candidate.onnx*")) or
                               (store_dir / "models" / ".staging").exists(),
                               timeout=60.0, interval=0.002)
        except AssertionError:
            pass
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)  # a few seconds at most, never a hang
    finally:
        proc.kill()
    log = (tmp_path / "first.log").read_text()
    assert code == 0 and "terminate called" not in log, log[-2000:]
    assert not _trainers(store_dir) and not (store_dir / "models" / ".staging").exists()
    cam.status.clear()
    again = distill_process(DOMAIN_ID, "cc", store_dir, teacher_url, tmp_path / "second.log",
                            **extra)
    try:
        status = latest_status(cam, again, lambda s: s["rounds_run"] == 1, "round 1 resumed",
                               timeout=120.0)  # export and gate run again
        registry = ModelRegistry(store_dir / "models")
        assert status["last_gate"]["deploy"] == (registry.version() == 1)
        assert depth.calls == ([str(registry.current())] if registry.version() else [])
    finally:
        again.send_signal(signal.SIGINT)
        again.wait(timeout=15)
    assert again.returncode == 0


def _kill_restart_until_deploy(ros: Ros, teacher_url: str, tmp_path: Path, ns: str,
                               kills: int, window_s: tuple[float, float], seed: int) -> dict:
    """Start the node, feed it, SIGKILL it at a random moment; ``kills`` times. Then run it
    until a validated deploy. Returns the figures; asserts none of the faults."""
    from depthkd_core.online.registry import ModelRegistry

    _, live = weak_student(tmp_path)
    depth = ros.add(FakeDepthNode(ros.context, ns, model=live))
    store_dir, cam, rng = tmp_path / "state", ros.camera(ns), random.Random(seed)
    extra = _extra(tmp_path, 20)
    figures = {"kills": 0, "orphans": 0, "most_trainers": 0, "lost_keyframes": 0}
    for life in range(kills + 1):
        cam.status.clear()
        proc = distill_process(DOMAIN_ID, ns, store_dir, teacher_url,
                               tmp_path / f"life{life}.log", **extra)
        try:
            _feed(cam, proc, range(life + 5) if life == 0 else range(life + 4, life + 5))
            if life == kills:  # the last life: run until a validated deploy
                wait_until(lambda: depth.calls, timeout=240.0, what="a validated deploy")
                break
            deadline = time.monotonic() + rng.uniform(*window_s)
            while time.monotonic() < deadline:  # the kill lands at a random moment
                figures["most_trainers"] = max(figures["most_trainers"], len(_trainers(store_dir)))
                time.sleep(0.05)
            stored = set(KeyframeStore(store_dir / "keyframes", writer=False).keys())
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            figures["kills"] += 1
        finally:
            proc.kill()
            proc.wait(timeout=10)
        try:
            wait_until(lambda: not _trainers(store_dir), timeout=10.0, what="no orphaned trainer")
        except AssertionError:
            figures["orphans"] += 1
        after = set(KeyframeStore(store_dir / "keyframes", writer=False).keys())
        figures["lost_keyframes"] += len(stored - after)
    registry = ModelRegistry(store_dir / "models")
    figures.update(rounds=json.loads((store_dir / "state.json").read_text())["rounds"],
                   deployed_version=registry.version(), keyframes=len(after))
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=15)
    print(f"kill/restart figures: {figures}")
    assert figures["orphans"] == 0 and figures["most_trainers"] <= 1, figures
    assert figures["lost_keyframes"] == 0 and registry.version() >= 1, figures
    assert depth.calls[-1] == str(registry.current())
    return figures


@pytest.mark.slow  # ~100 s on the shared 2 cores: the last life runs a whole round
def test_three_random_sigkills_still_reach_a_validated_deploy(
        ros: Ros, teacher_url: str, tmp_path: Path) -> None:
    _kill_restart_until_deploy(ros, teacher_url, tmp_path, "k3", 3, (1.0, 6.0), seed=3)


@pytest.mark.slow  # ~6 min: 20 node starts, rounds resumed across the kills
@pytest.mark.timeout(1200)
def test_twenty_random_sigkills_with_a_live_teacher(
        ros: Ros, teacher_url: str, tmp_path: Path) -> None:
    _kill_restart_until_deploy(ros, teacher_url, tmp_path, "k20", 20, (3.0, 25.0), seed=20)
