"""distill_node with real rclpy, real DDS and a real teacher server on 127.0.0.1.

A tiny teacher (depth = 1 + 4 * red, known per pixel) is served by the real
KServe v2 app; faults: teacher down at start, answering 500s, slow, killed and back,
garbage; store full; rollback pushes to a fake depth node that records
set_parameters, and to the real DepthNode; what is live is read from the depth node. The
acceptance test and the node-process tests are in test_distill_node_process.py; the shared
harness in distill_harness.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.ros

import torch
from diagnostic_msgs.msg import DiagnosticStatus
from distill_harness import (  # fixtures ros, teacher_url: conftest's pytest_plugins
    BrokenTeacher,
    Camera,
    FakeDepthNode,
    H,
    RampTeacher,
    Ros,
    W,
    closed_port_url,
    frame,
    token_file,
    wait_until,
)
from helpers import ros_domain, write_linear_onnx
from rclpy.parameter import Parameter

from depthkd_core.online.keyframes import KeyframeStore, StoreFullError
from depthkd_core.online.registry import ModelRegistry
from depthkd_core.online.rounds import RoundState
from depthkd_core.serving.server import create_app
from depthkd_core.serving.transport import BackgroundServer
from depthkd_ros import distill_node as dn
from depthkd_ros.depth_node import DepthNode

DOMAIN_ID = ros_domain(57)


def test_start_up_validation_names_the_parameter(ros: Ros, tmp_path: Path) -> None:
    cases = [({"teacher_url": "http://127.0.0.1:1"}, ValueError, "store_dir"),
             ({"store_dir": str(tmp_path), "teacher_url": ""}, ValueError, "teacher_url"),
             ({"store_dir": str(tmp_path), "teacher_url": "ftp://x"}, ValueError, "teacher_url"),
             ({"store_dir": str(tmp_path), "teacher_url": "http://x",
               "token_file": str(tmp_path / "missing")}, FileNotFoundError, "token_file"),
             ({"store_dir": str(tmp_path), "teacher_url": "http://x",
               "input_transport": "udp"}, ValueError, "input_transport")]
    for params, error, name in cases:
        with pytest.raises(error, match=name):
            dn.DistillNode(context=ros.context, namespace="bad", parameter_overrides=[
                Parameter(k, value=v) for k, v in params.items()])
    first = ros.distill("busy", tmp_path / "busy", teacher_url=closed_port_url())
    with pytest.raises(RuntimeError, match="in use by another distill_node"):  # one per store
        ros.distill("busy2", tmp_path / "busy", teacher_url=closed_port_url())
    ros.executor.remove_node(first)
    first.destroy_node()
    ros.nodes.remove(first)
    again = ros.distill("busy", tmp_path / "busy", teacher_url=closed_port_url())  # released
    assert again.status()["frames_stored"] == 0


def test_teacher_labels_keyframes_end_to_end(ros: Ros, teacher_url: str, tmp_path: Path) -> None:
    node = ros.distill("label", tmp_path, teacher_url=teacher_url, model_name="ramp",
                       token_file=token_file(tmp_path))
    cam = ros.camera("label")
    cam.stream(node, range(3))
    wait_until(lambda: node.counts["labelled"] >= 3, what="3 teacher labels")
    store = KeyframeStore(tmp_path / "keyframes", writer=False)
    keys = store.keys()
    assert len(keys) == 3 and store.pending_teacher() == []
    for key, seed in zip(keys, range(3), strict=True):
        rgb = store.load(key).rgb
        np.testing.assert_array_equal(rgb, frame(seed))
        expected = 1.0 + 4.0 * rgb[..., 0].astype(np.float32) / 255.0
        np.testing.assert_allclose(store.teacher_depth(key), expected, rtol=1e-5)
    status = wait_until(lambda: next((s for s in reversed(cam.status)
                                      if s["pending_teacher"] == 0 and s["frames_stored"] == 3),
                                     None), what="status after labelling")
    assert status["teacher_failures"] == 0 and status["breaker"] == "closed"
    assert status["teacher_rtt_ms"] > 0 and status["rounds_run"] == 0
    doc = (Path(__file__).resolve().parents[1] / "docs" / "distill_node.md").read_text()
    assert [key for key in status if f"`{key}`" not in doc] == []
    assert wait_until(lambda: cam.diag)[-1].level == DiagnosticStatus.OK


def test_teacher_down_at_start_keeps_collecting(ros: Ros, tmp_path: Path) -> None:
    node = ros.distill("down", tmp_path, teacher_url=closed_port_url(), teacher_retries=0,
                       breaker_failures=2, breaker_cooldown_s=60.0, teacher_timeout_s=1.0)
    cam = ros.camera("down")
    cam.stream(node, range(2))
    wait_until(lambda: node.client.breaker.is_open, what="breaker to open")
    cam.stream(node, range(2, 4))  # still collecting with the teacher down
    status = wait_until(lambda: next((s for s in reversed(cam.status)
                                      if s["frames_stored"] == 4), None), what="4 stored")
    assert status["pending_teacher"] == 4 and status["breaker"] == "open"
    assert status["teacher_failures"] >= 2 and "teacher" in status["last_error"]
    assert wait_until(lambda: cam.diag)[-1].level == DiagnosticStatus.WARN


def test_teacher_500s_are_counted_never_stored(ros: Ros, tmp_path: Path) -> None:
    with BackgroundServer(create_app(BrokenTeacher(), "ramp", max_wait_ms=0)) as url:
        node = ros.distill("err", tmp_path, teacher_url=url, model_name="ramp",
                           teacher_retries=1, breaker_failures=100)
        cam = ros.camera("err")
        cam.stream(node, range(2))
        wait_until(lambda: node.counts["teacher_failures"] >= 2, what="failures")
    assert node.counts["labelled"] == 0
    assert len(KeyframeStore(tmp_path / "keyframes", writer=False).pending_teacher()) == 2
    assert "500" in node.status()["last_error"]


def test_store_full_is_reported_and_the_node_survives(ros: Ros, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    node = ros.distill("full", tmp_path, teacher_url=closed_port_url(), breaker_failures=1,
                       breaker_cooldown_s=60.0)
    cam = ros.camera("full")
    cam.stream(node, range(1))

    def full(*args: Any, **kwargs: Any) -> str:
        raise StoreFullError("only 1 MiB free, need 100 MiB")

    monkeypatch.setattr(node.store, "add", full)
    cam.stream(node, range(1, 3), count_key="store_errors")
    error = wait_until(lambda: next((d for d in reversed(cam.diag)
                                     if d.level == DiagnosticStatus.ERROR), None), what="ERROR")
    assert "store full" in error.message and "1 MiB free" in error.message
    monkeypatch.undo()
    cam.stream(node, range(3, 4))  # space again: collecting resumes, nothing was lost
    assert len(KeyframeStore(tmp_path / "keyframes", writer=False).keys()) == 2
    wait_until(lambda: cam.diag[-1].level != DiagnosticStatus.ERROR, what="error cleared")


def _deployed(root: Path, base: Path, versions: list[Path]) -> ModelRegistry:
    """A store where ``versions`` were deployed in turn over ``base`` (the last is live)."""
    registry = ModelRegistry(root / "models")
    for i, model in enumerate(versions):
        ckpt = root / f"c{i}.pt"
        ckpt.write_text(str(i))
        registry.publish(model, ckpt)
    state = RoundState(root / "state.json")
    state.base_model, state.on_base = str(base), False
    state.save()
    return registry


def test_rollback_parameter_pushes_previous_model_then_the_base(ros: Ros, tmp_path: Path) -> None:
    models = [write_linear_onnx(tmp_path / f"m{i}.onnx", 1.0 + i, 1.0) for i in range(2)]
    registry = _deployed(tmp_path / "state", tmp_path / "bad.onnx", models)
    v1, v2 = registry.previous(), registry.current()
    depth = ros.add(FakeDepthNode(ros.context, "rb", model=v2))
    node = ros.distill("rb", tmp_path / "state", teacher_url=closed_port_url(),
                       service_timeout_s=5.0)
    wait_until(lambda: node.status()["live_model"] == str(v2), what="the live model read")
    assert node.set_parameters([Parameter("rollback", value=True)])[0].successful
    wait_until(lambda: node.get_parameter("rollback").value is False and depth.calls,
               what="rollback push and reset")
    assert depth.calls == [str(v1)]
    assert node.counts["rollbacks"] == 1 and node.deployed == str(v1)
    assert node.status()["deployed_version"] == "v0001"
    node.set_parameters([Parameter("rollback", value=True)])  # to the base: it refuses it
    wait_until(lambda: len(depth.calls) == 2 and node.get_parameter("rollback").value is False)
    assert depth.calls[1] == str(tmp_path / "bad.onnx")
    wait_until(lambda: "bad model" in node.last_error, what="the depth node's reason")
    assert node.counts["rollbacks"] == 1 and node.status()["deployed_version"] == "v0001"


def test_rollback_hot_swaps_the_real_depth_node(ros: Ros, tmp_path: Path) -> None:
    first = write_linear_onnx(tmp_path / "first.onnx", 4.0, 1.0)
    previous = write_linear_onnx(tmp_path / "previous.onnx", 2.0, 1.0)
    registry = _deployed(tmp_path / "state", tmp_path / "missing.onnx", [previous, first])
    v1, v2 = registry.previous(), registry.current()
    depth = ros.add(DepthNode(context=ros.context, namespace="real", parameter_overrides=[
        Parameter("model_path", value=str(v2)), Parameter("model_input_height", value=H),
        Parameter("model_input_width", value=W)]))
    node = ros.distill("real", tmp_path / "state", teacher_url=closed_port_url())
    wait_until(lambda: node.status()["live_model"] == str(v2), what="the live model read")
    node.set_parameters([Parameter("rollback", value=True)])
    wait_until(lambda: depth.get_parameter("model_path").value == str(v1),
               what="depth node to run the previous model")
    assert depth._pipeline.model_path == str(v1)  # swapped, not just set
    node.set_parameters([Parameter("rollback", value=True)])  # the base is gone: refused
    wait_until(lambda: "does not exist" in node.last_error, what="depth node's reason")
    assert depth.get_parameter("model_path").value == str(v1)


def test_a_live_model_without_checkpoint_is_labelled_for_but_not_trained(
        ros: Ros, teacher_url: str, tmp_path: Path) -> None:
    mine = write_linear_onnx(tmp_path / "mine.onnx", 4.0, 1.0)  # no mine.pt, no mine.json
    ros.add(FakeDepthNode(ros.context, "nockpt", model=mine))
    node = ros.distill("nockpt", tmp_path / "state", teacher_url=teacher_url, model_name="ramp",
                       token_file=token_file(tmp_path), min_new_keyframes=2)
    cam = ros.camera("nockpt")
    cam.stream(node, range(2))
    status = wait_until(lambda: (s := node.status())["training"] and s, what="the refusal")
    assert "no checkpoint for the live model" in status["training"] and "mine.pt" in status["training"]
    assert status["live_model"] == str(mine) and status["rounds_run"] == 0
    assert not list((tmp_path / "state" / "rounds").glob("round_*"))


def test_restart_resumes_the_store(ros: Ros, tmp_path: Path) -> None:
    url = closed_port_url()
    node = ros.distill("restart", tmp_path, teacher_url=url, breaker_failures=1)
    cam = ros.camera("restart")
    cam.stream(node, range(3))
    ros.executor.remove_node(node)
    node.destroy_node()
    ros.nodes.remove(node)
    again = ros.distill("restart", tmp_path, teacher_url=url, breaker_failures=1)
    assert again.status()["frames_stored"] == 3 and again.status()["pending_teacher"] == 3
    cam.stream(again, range(3, 4))
    assert again.status()["frames_stored"] == 4


def test_doc_lists_every_parameter_and_topic() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "distill_node.md").read_text()
    missing = [spec.name for spec in dn.PARAMS if f"| `{spec.name}` |" not in doc]
    assert not missing, f"docs/distill_node.md does not describe {missing}"
    for name in ("image", "image/compressed", "camera_info", "distill/status", "/diagnostics",
                 "<depth_node>/set_parameters"):
        assert f"`{name}`" in doc, name


# -- node-level faults: slow, killed and garbage teachers; the node itself SIGKILLed --------
class SlowTeacher(RampTeacher):
    """Answers, but only after far longer than the node's teacher_timeout_s."""

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        time.sleep(1.0)
        return super()._predict(images)


def _alive_and_collecting(node: dn.DistillNode, cam: Camera, seeds: range) -> None:
    """The image path is independent of the teacher: new frames are still stored, quickly."""
    start = time.monotonic()
    cam.stream(node, seeds)
    assert time.monotonic() - start < 5.0 * len(seeds), "collection was blocked"
    assert all(t.is_alive() for t in node._threads)  # threads survived


def test_slow_teacher_times_out_opens_breaker_and_never_blocks_collection(
        ros: Ros, tmp_path: Path) -> None:
    app = create_app(SlowTeacher(), "ramp", max_wait_ms=0)
    with BackgroundServer(app, timeout_graceful_shutdown=1) as url:
        node = ros.distill("slow", tmp_path, teacher_url=url, model_name="ramp",
                           teacher_timeout_s=0.2, teacher_retries=0, breaker_failures=2,
                           breaker_cooldown_s=60.0, max_backoff_s=0.2)
        cam = ros.camera("slow")
        cam.stream(node, range(2))
        wait_until(lambda: node.client.breaker.is_open, what="breaker to open on timeouts")
        _alive_and_collecting(node, cam, range(2, 5))  # while the teacher hangs
        status = node.status()
    assert status["breaker"] == "open" and status["labelled"] == 0
    assert status["teacher_failures"] >= 1 and "Timeout" in status["last_error"]
    assert status["frames_stored"] == 5 and status["pending_teacher"] == 5


def test_teacher_killed_mid_run_then_back_on_the_same_port(ros: Ros, tmp_path: Path) -> None:
    def app() -> Any:
        return create_app(RampTeacher(), "ramp", max_wait_ms=0)

    params = {"model_name": "ramp", "teacher_timeout_s": 0.5, "teacher_retries": 0,
              "breaker_failures": 2, "breaker_cooldown_s": 0.5, "max_backoff_s": 0.3}
    with BackgroundServer(app()) as url:
        node = ros.distill("killed", tmp_path, teacher_url=url, **params)
        cam = ros.camera("killed")
        cam.stream(node, range(2))
        wait_until(lambda: node.counts["labelled"] == 2, what="2 labels before the kill")
    port = int(url.rsplit(":", 1)[1])
    _alive_and_collecting(node, cam, range(2, 4))
    wait_until(lambda: node.counts["teacher_failures"] >= 2, what="failures while it is down")
    assert node.counts["labelled"] == 2 and node.status()["pending_teacher"] == 2
    with BackgroundServer(app(), port=port) as again:
        assert again == url
        wait_until(lambda: node.counts["labelled"] == 4, what="labelling to resume")
        status = wait_until(lambda: (s := node.status())["breaker"] == "closed" and s)
    assert status["pending_teacher"] == 0 and status["frames_stored"] == 4


def _garbage_app() -> Any:
    """Valid KServe metadata, then HTTP 200 with a body that is no KServe reply."""
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    app = FastAPI()
    app.get("/v2/models/ramp")(lambda: {"name": "ramp", "parameters": {"is_metric": True}})
    app.post("/v2/models/ramp/infer")(lambda: PlainTextResponse("<html>proxy says hi</html>"))
    return app


def test_teacher_garbage_is_a_failure_nothing_labelled(ros: Ros, tmp_path: Path) -> None:
    with BackgroundServer(_garbage_app()) as url:
        node = ros.distill("garbage", tmp_path, teacher_url=url, model_name="ramp",
                           teacher_retries=1, breaker_failures=100, max_backoff_s=0.2)
        cam = ros.camera("garbage")
        cam.stream(node, range(2))
        wait_until(lambda: node.counts["teacher_failures"] >= 2, what="garbage failures")
        _alive_and_collecting(node, cam, range(2, 3))
    status = node.status()
    assert status["labelled"] == 0 and status["teacher_rejected"] == 0
    assert status["pending_teacher"] == 3 and "not valid JSON" in status["last_error"]
    store = KeyframeStore(tmp_path / "keyframes", writer=False)
    assert [store.teacher_depth(k) for k in store.keys()] == [None] * 3
