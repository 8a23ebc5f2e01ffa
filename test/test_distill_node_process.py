"""distill_node's acceptance test (collect -> label -> fine-tune -> gate -> hot-swap into the
real depth node) and the node as a process killed with SIGKILL, over real DDS with a real
teacher server on 127.0.0.1 (harness: distill_harness.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

# the harness imports rclpy, the message packages and the teacher server (fastapi, uvicorn)
pytest.importorskip("distill_harness")
pytestmark = pytest.mark.ros

import torch  # noqa: E402
from distill_harness import (  # noqa: E402, F401 - ros, teacher_url: fixtures
    QOS,
    TOKEN,
    Camera,
    FakeDepthNode,
    H,
    RampTeacher,
    Ros,
    W,
    camera_info,
    distill_process,
    frame,
    latest_status,
    ros,
    teacher_url,
    token_file,
    wait_until,
    weak_student,
)
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from depthkd_core.models.teacher_base import Teacher  # noqa: E402
from helpers import ros_domain  # noqa: E402
from depthkd_core.online.keyframes import KeyframeStore  # noqa: E402
from depthkd_core.serving.server import BackgroundServer, create_app  # noqa: E402
from depthkd_ros.conversions import rgb_to_image  # noqa: E402
from depthkd_ros.depth_node import DepthNode  # noqa: E402

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
        wait_until(lambda: depth._pubs["depth"].get_subscription_count(), what="depth sub")  # noqa: SLF001
        held_out = range(100, 103)
        before = _live_abs_rel(cam, depth_msgs, held_out)
        with BackgroundServer(create_app(DomainTeacher(), "domain", token=TOKEN)) as url:
            params = dict(teacher_url=url, model_name="domain", token_file=token_file(tmp_path),
                          student_checkpoint=str(ckpt), live_model=str(live),
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
            time.sleep(2.0)  # the restart pushes the current version (idempotent), no new round
            assert registry.version() == 1 and again.counts["deploys"] == 0
            assert depth.get_parameter("model_path").value == str(registry.current())
            again._gate_and_deploy(99, ckpt)  # noqa: SLF001 - the weak student is worse now
            assert not again.status()["last_gate"]["deploy"] and registry.version() == 1
            assert depth.get_parameter("model_path").value == str(registry.current())
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
    depth = ros.add(FakeDepthNode(ros.context, "sk2"))
    store_dir, cam = tmp_path / "state", ros.camera("sk2")
    extra = {"student_checkpoint": ckpt, "live_model": live, "finetune_config": config,
             "min_new_keyframes": 8, "gate_margin": 0.0, "export_height": 64, "export_width": 64}
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
                       == "v0001", "round 1 settled, registry open")  # it opens after torch
        time.sleep(1.0)
        status = latest_status(cam, again, lambda s: True, "a later status")
        assert status["deploys"] == 0 and status["deployed_version"] == "v0001"
        assert registry.version() == 1  # round 1 re-ran but was not exported or deployed twice
        log = (tmp_path / "second.log").read_text()
        assert "round 1: fine-tuning" in log and "round 1 gate" not in log
        assert set(depth.calls) == {str(registry.current())}  # only the idempotent re-push
    finally:
        again.send_signal(2)
        again.wait(timeout=15)
