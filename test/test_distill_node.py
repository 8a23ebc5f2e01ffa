"""distill_node with real rclpy, real DDS and a real teacher server on 127.0.0.1.

A tiny teacher (depth = 1 + 4 * red, known per pixel) is served by the real
KServe v2 app; faults: teacher down at start, teacher answering 500s, store full;
rollback pushes to a fake depth node that records set_parameters, and to the real
DepthNode.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("depthkd_core.online.keyframes")
pytestmark = pytest.mark.ros

import torch  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from rcl_interfaces.msg import SetParametersResult  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from depthkd_core.geometry import Intrinsics  # noqa: E402
from depthkd_core.models.teachers import Teacher  # noqa: E402
from depthkd_core.online.keyframes import KeyframeStore, StoreFullError  # noqa: E402
from depthkd_core.serving.server import BackgroundServer, create_app  # noqa: E402
from depthkd_ros import distill_node as dn  # noqa: E402
from depthkd_ros.conversions import rgb_to_image  # noqa: E402
from depthkd_ros.depth_node import DepthNode  # noqa: E402
from test_inference import write_linear_onnx  # noqa: E402

DOMAIN_ID = 57
QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
H, W = 48, 64
K = Intrinsics(fx=60.0, fy=62.0, cx=31.5, cy=23.5, width=W, height=H)
TOKEN = "distill-token"


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


class RampTeacher(Teacher):
    """depth = 1 + 4 * red, at the input size (no resize)."""

    name = "ramp"
    input_size = (H, W)

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        return 1.0 + 4.0 * images[:, :1]


class BrokenTeacher(RampTeacher):
    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("GPU fell off")


def frame(seed: int) -> np.ndarray:
    """Random 8x8 colour blocks: each seed is novel against the others."""
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(0, 256, (H // 8, W // 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)


def camera_info() -> CameraInfo:
    info = CameraInfo(width=W, height=H)
    info.k = K.matrix().ravel().tolist()
    info.p = [K.fx, 0.0, K.cx, 0.0, 0.0, K.fy, K.cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return info


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


class Ros:
    """One context + executor thread; a camera publisher and a status listener per namespace."""

    def __init__(self) -> None:
        self.context = Context()
        rclpy.init(context=self.context, domain_id=DOMAIN_ID)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.nodes: list[Node] = []
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def add(self, node: Node) -> Node:
        self.nodes.append(node)
        self.executor.add_node(node)
        return node

    def distill(self, ns: str, store: Path, **params: Any) -> dn.DistillNode:
        overrides = [Parameter("store_dir", value=str(store)), Parameter("min_interval_s", value=0.0),
                     Parameter("status_period", value=0.2), *[
                         Parameter(k, value=v) for k, v in params.items()]]
        node = self.add(dn.DistillNode(context=self.context, namespace=ns,
                                       parameter_overrides=overrides))
        return node

    def camera(self, ns: str) -> "Camera":
        return Camera(self, ns)

    def close(self) -> None:
        self.executor.shutdown()
        for node in reversed(self.nodes):
            node.destroy_node()
        rclpy.shutdown(context=self.context)
        self.thread.join(timeout=5.0)


class Camera:
    """Publishes frames and camera_info; records distill/status and /diagnostics."""

    def __init__(self, ros: Ros, ns: str) -> None:
        self.node = ros.add(rclpy.create_node(f"camera_{ns}", namespace=ns, context=ros.context))
        self.image = self.node.create_publisher(Image, "image", QOS)
        self.info = self.node.create_publisher(CameraInfo, "camera_info", QOS)
        self.status: list[dict] = []
        self.diag: list[DiagnosticStatus] = []
        self.node.create_subscription(String, "distill/status",
                                      lambda m: self.status.append(json.loads(m.data)), QOS)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, QOS)
        self.ns = ns
        self.seq = 0

    def _on_diag(self, msg: DiagnosticArray) -> None:
        self.diag += [s for s in msg.status if s.name.startswith(f"/{self.ns}/distill_node")]

    def send(self, rgb: np.ndarray) -> None:
        self.seq += 1
        msg = rgb_to_image(rgb)
        msg.header.stamp.sec = 1000 + self.seq
        self.info.publish(camera_info())
        self.image.publish(msg)

    def stream(self, node: dn.DistillNode, seeds: range, count_key: str = "keyframes") -> None:
        """Send each frame until the node has stored it (DDS discovery may drop the first)."""
        wait_until(lambda: self.image.get_subscription_count(), what="discovery")
        for seed in seeds:
            target = node.counts[count_key] + 1
            wait_until(lambda s=seed, t=target: node.counts[count_key] >= t or self.send(frame(s)),
                       what=f"frame {seed} to be handled; counts {node.counts}")


@pytest.fixture(scope="module")
def ros() -> Any:
    r = Ros()
    yield r
    r.close()


@pytest.fixture(scope="module")
def teacher_url() -> Any:
    with BackgroundServer(create_app(RampTeacher(), "ramp", token=TOKEN, max_wait_ms=0)) as url:
        yield url


def token_file(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


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


def test_parse_round_result() -> None:
    out = "step 1 loss 0.5\n" + json.dumps({"checkpoint": "/w/c.pt", "steps": 3, "loss": 0.25})
    assert dn.parse_round_result(out) == {"checkpoint": "/w/c.pt", "steps": 3, "loss": 0.25}
    with pytest.raises(RuntimeError, match="no result line"):
        dn.parse_round_result("Traceback ...\n")


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


class FakeDepthNode(Node):
    """Declares model_path and records every set_parameters call; rejects *bad.onnx."""

    def __init__(self, context: Context, ns: str) -> None:
        super().__init__("depth_node", namespace=ns, context=context)
        self.declare_parameter("model_path", "")
        self.calls: list[str] = []
        self.add_on_set_parameters_callback(self._on_set)

    def _on_set(self, params: list[Parameter]) -> SetParametersResult:
        self.calls += [p.value for p in params]
        bad = any(str(p.value).endswith("bad.onnx") for p in params)
        return SetParametersResult(successful=not bad, reason="bad model" if bad else "")


class FakeRegistry:
    """Two versions: ``previous`` and a current one; rollback makes previous current."""

    def __init__(self, previous: Path) -> None:
        self.stack = [previous, previous.with_name("v0002.onnx")]

    def current(self) -> Path | None:
        return self.stack[-1]

    def previous(self) -> Path | None:
        return self.stack[-2] if len(self.stack) > 1 else None

    def rollback(self) -> Path:
        self.stack.pop()
        return self.stack[-1]


def _install_registry(node: dn.DistillNode, registry: FakeRegistry) -> None:
    wait_until(lambda: node.registry is not None, what="registry open")
    with node._registry_lock:  # noqa: SLF001 - test hook
        node.registry = registry


def test_rollback_parameter_pushes_previous_model(ros: Ros, tmp_path: Path) -> None:
    depth = ros.add(FakeDepthNode(ros.context, "rb"))
    node = ros.distill("rb", tmp_path, teacher_url=closed_port_url(), service_timeout_s=5.0)
    _install_registry(node, FakeRegistry(tmp_path / "v0001.onnx"))
    assert node.set_parameters([Parameter("rollback", value=True)])[0].successful
    wait_until(lambda: node.get_parameter("rollback").value is False and depth.calls,
               what="rollback push and reset")
    assert depth.calls == [str(tmp_path / "v0001.onnx")]
    assert node.counts["rollbacks"] == 1 and node.deployed == str(tmp_path / "v0001.onnx")
    assert node.status()["deployed_version"] == "v0001"
    _install_registry(node, FakeRegistry(tmp_path / "bad.onnx"))  # depth node refuses it
    node.set_parameters([Parameter("rollback", value=True)])
    wait_until(lambda: len(depth.calls) == 2 and node.get_parameter("rollback").value is False)
    assert node.counts["rollbacks"] == 1 and "bad model" in node.last_error


def test_rollback_hot_swaps_the_real_depth_node(ros: Ros, tmp_path: Path) -> None:
    first = write_linear_onnx(tmp_path / "first.onnx", 4.0, 1.0)
    previous = write_linear_onnx(tmp_path / "previous.onnx", 2.0, 1.0)
    depth = ros.add(DepthNode(context=ros.context, namespace="real", parameter_overrides=[
        Parameter("model_path", value=str(first)), Parameter("model_input_height", value=H),
        Parameter("model_input_width", value=W)]))
    node = ros.distill("real", tmp_path / "state", teacher_url=closed_port_url())
    _install_registry(node, FakeRegistry(previous))
    node.set_parameters([Parameter("rollback", value=True)])
    wait_until(lambda: depth.get_parameter("model_path").value == str(previous),
               what="depth node to run the previous model")
    assert depth._pipeline.model_path == str(previous)  # noqa: SLF001 - swapped, not just set
    _install_registry(node, FakeRegistry(tmp_path / "missing.onnx"))
    node.set_parameters([Parameter("rollback", value=True)])
    wait_until(lambda: "does not exist" in node.last_error, what="depth node's reason")
    assert depth.get_parameter("model_path").value == str(previous)


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


def _weak_student(tmp_path: Path) -> tuple[Path, Path]:
    """A random-init student checkpoint and its ONNX (what the depth node runs first)."""
    from depthkd_core.export.onnx_export import export_onnx
    from depthkd_core.models import ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(encoder="mobilenetv2_050", decoder_channels=(16, 16, 16, 16))
    model = build_model(cfg).eval()
    ckpt = save_checkpoint(tmp_path / "student.pt", model, cfg)
    assert export_onnx(model, tmp_path / "live.onnx", 64, 64).passed
    return ckpt, tmp_path / "live.onnx"


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
            camera.info.publish(camera_info())
            camera.image.publish(m)
            return next((d for d in depth_msgs if d.header.stamp.sec == s), None)

        scores.append(_abs_rel(depth_image_to_numpy(wait_until(got, what="depth")), frame(seed)))
    return float(np.mean(scores))


@pytest.mark.slow  # ~45 s on 2 busy cores: a real fine-tuning process and two ONNX exports
def test_end_to_end_collect_label_finetune_gate_hot_swap(tmp_path: Path) -> None:
    """Weak student live; frames from an unseen domain; the distill node labels, fine-tunes
    in a separate process, gates and hot-swaps; the live output then agrees with the teacher
    by a margin. A restart resumes without deploying the same round twice."""
    from depthkd_core.online.gate import ModelRegistry

    ckpt, live = _weak_student(tmp_path)
    config = tmp_path / "round.yaml"
    config.write_text("method: labelfree\nsteps_per_round: 40\nlr: 0.003\nbatch_size: 4\n"
                      "height: 64\nwidth: 64\nckpt_every: 20\n"
                      "method_kwargs: {w_cwd: 1.0, w_geo: 1.0, w_mse: 1.0, n_points: 256}\n")
    context = Context()
    rclpy.init(context=context, domain_id=DOMAIN_ID + 1)
    executor = SingleThreadedExecutor(context=context)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    ros = Ros.__new__(Ros)  # reuse the helpers on this context (domain 58)
    ros.context, ros.executor, ros.nodes, ros.thread = context, executor, [], thread
    try:
        depth = ros.add(DepthNode(context=context, namespace="e2e",
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
        executor.shutdown()
        for node in reversed(ros.nodes):
            node.destroy_node()
        rclpy.shutdown(context=context)
        thread.join(timeout=5.0)


def test_doc_lists_every_parameter_and_topic() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "distill_node.md").read_text()
    missing = [spec.name for spec in dn.PARAMS if f"| `{spec.name}` |" not in doc]
    assert not missing, f"docs/distill_node.md does not describe {missing}"
    for name in ("image", "image/compressed", "camera_info", "distill/status", "/diagnostics",
                 "<depth_node>/set_parameters"):
        assert f"`{name}`" in doc, name
