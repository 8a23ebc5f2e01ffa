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
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("depthkd_core.online.keyframes")
pytestmark = pytest.mark.ros

import helpers  # noqa: E402
import torch  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from helpers import write_linear_onnx  # noqa: E402
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

DOMAIN_ID = 57
QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
H, W = 48, 64
K = Intrinsics(fx=60.0, fy=62.0, cx=31.5, cy=23.5, width=W, height=H)
TOKEN = "distill-token"


# Fine-tuning rounds and HTTP round trips are slower than the depth node's frames.
wait_until = partial(helpers.wait_until, timeout=15.0, interval=0.02)


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


# The acceptance test of the on-robot loop: kept in the default suite (~45 s on 2 cores).
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
    assert all(t.is_alive() for t in node._threads)  # noqa: SLF001 - threads survived


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
    assert [store.teacher_depth(k) for k in store.keys()] == [None] * 3  # noqa: SIM118


def _distill_process(ns: str, store: Path, url: str, log: Path, **extra: Any) -> Any:
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "depthkd_ros.distill_node", "--ros-args", "-r", f"__ns:=/{ns}",
            "-p", f"store_dir:={store}", "-p", f"teacher_url:={url}", "-p", "model_name:=ramp",
            "-p", f"token_file:={token_file(store.parent)}", "-p", "min_interval_s:=0.0",
            "-p", "status_period:=0.2", *[a for k, v in extra.items() for a in ("-p", f"{k}:={v}")]]
    env = {**os.environ, "ROS_DOMAIN_ID": str(DOMAIN_ID), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _latest_status(cam: Camera, proc: Any, predicate: Callable[[dict], bool], what: str) -> dict:
    def check() -> dict | None:
        assert proc.poll() is None, f"distill_node exited with {proc.returncode}"
        return next((s for s in reversed(cam.status[-5:]) if predicate(s)), None)
    return wait_until(check, timeout=30.0, what=what)


def test_distill_node_sigkilled_restarts_with_the_store_intact(
        ros: Ros, teacher_url: str, tmp_path: Path) -> None:
    import signal

    store_dir, cam = tmp_path / "state", ros.camera("sigkill")
    proc = _distill_process("sigkill", store_dir, teacher_url, tmp_path / "first.log")
    try:
        wait_until(lambda: cam.image.get_subscription_count(), timeout=30.0, what="discovery")
        for seed in range(4):  # each frame until the status shows it stored (discovery races)
            _latest_status(cam, proc, lambda s, n=seed + 1, k=seed: cam.send(frame(k)) or
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
    again = _distill_process("sigkill", store_dir, teacher_url, tmp_path / "second.log")
    try:
        status = _latest_status(cam, again, lambda s: s["pending_teacher"] == 0, "restart")
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

    from depthkd_core.online.gate import ModelRegistry

    ckpt, live = _weak_student(tmp_path)
    config = tmp_path / "round.yaml"
    config.write_text("method: labelfree\nsteps_per_round: 10\nlr: 0.003\nbatch_size: 4\n"
                      "height: 64\nwidth: 64\nckpt_every: 5\n")
    depth = ros.add(FakeDepthNode(ros.context, "sk2"))
    store_dir, cam = tmp_path / "state", ros.camera("sk2")
    extra = {"student_checkpoint": ckpt, "live_model": live, "finetune_config": config,
             "min_new_keyframes": 8, "gate_margin": 0.0, "export_height": 64, "export_width": 64}
    proc = _distill_process("sk2", store_dir, teacher_url, tmp_path / "first.log", **extra)
    try:
        wait_until(lambda: cam.image.get_subscription_count(), timeout=30.0, what="discovery")
        for seed in range(10):
            _latest_status(cam, proc, lambda s, n=seed + 1, k=seed: cam.send(frame(k)) or
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
    again = _distill_process("sk2", store_dir, teacher_url, tmp_path / "second.log", **extra)
    try:
        _latest_status(cam, again, lambda s: s["rounds_run"] == 1 and s["deployed_version"]
                       == "v0001", "round 1 settled, registry open")  # it opens after torch
        time.sleep(1.0)
        status = _latest_status(cam, again, lambda s: True, "a later status")
        assert status["deploys"] == 0 and status["deployed_version"] == "v0001"
        assert registry.version() == 1  # round 1 re-ran but was not exported or deployed twice
        log = (tmp_path / "second.log").read_text()
        assert "round 1: fine-tuning" in log and "round 1 gate" not in log
        assert set(depth.calls) == {str(registry.current())}  # only the idempotent re-push
    finally:
        again.send_signal(2)
        again.wait(timeout=15)
