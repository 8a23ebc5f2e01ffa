"""What the distill_node test modules share: a tiny teacher, frames, a ROS context with an
executor thread, a camera that records distill/status, a fake depth node, node processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path
from typing import Any, Callable

import helpers
import numpy as np
import pytest
import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rcl_interfaces.msg import SetParametersResult
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import String

from depthkd_core.geometry import Intrinsics
from depthkd_core.models.teacher_base import Teacher
from depthkd_core.serving.server import create_app
from depthkd_core.serving.transport import BackgroundServer
from depthkd_ros import distill_node as dn
from depthkd_ros.conversions import rgb_to_image

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


def camera_info(header: Any = None) -> CameraInfo:
    """The camera's CameraInfo, stamped like ``header`` (its image's) as a driver does:
    depth_node pairs them by stamp."""
    info = CameraInfo(width=W, height=H)
    if header is not None:
        info.header = header
    info.k = K.matrix().ravel().tolist()
    info.p = [K.fx, 0.0, K.cx, 0.0, 0.0, K.fy, K.cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return info


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


class Ros:
    """One context (on ``domain_id``) + executor thread; cameras and nodes added to it."""

    def __init__(self, domain_id: int) -> None:
        self.context, self.domain_id = Context(), domain_id
        rclpy.init(context=self.context, domain_id=domain_id)
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
        self.info.publish(camera_info(msg.header))
        self.image.publish(msg)

    def stream(self, node: dn.DistillNode, seeds: range, count_key: str = "keyframes") -> None:
        """Send each frame until the node has stored it (DDS discovery may drop the first)."""
        wait_until(lambda: self.image.get_subscription_count(), what="discovery")
        for seed in seeds:
            target = node.counts[count_key] + 1
            wait_until(lambda s=seed, t=target: node.counts[count_key] >= t or self.send(frame(s)),
                       what=f"frame {seed} to be handled; counts {node.counts}")


def token_file(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


class FakeDepthNode(Node):
    """Declares model_path (``model``: what it runs first) and records every set_parameters
    call; rejects *bad.onnx."""

    def __init__(self, context: Context, ns: str, model: str | Path = "") -> None:
        super().__init__("depth_node", namespace=ns, context=context)
        self.declare_parameter("model_path", str(model))
        self.calls: list[str] = []
        self.add_on_set_parameters_callback(self._on_set)

    def _on_set(self, params: list[Parameter]) -> SetParametersResult:
        self.calls += [p.value for p in params]
        bad = any(str(p.value).endswith("bad.onnx") for p in params)
        return SetParametersResult(successful=not bad, reason="bad model" if bad else "")


def weak_student(tmp_path: Path) -> tuple[Path, Path]:
    """A random-init student checkpoint and its ONNX (what the depth node runs first), as
    ``live.pt`` beside ``live.onnx``: the distill node finds the checkpoint by that name."""
    from depthkd_core.export.onnx_export import export_onnx
    from depthkd_core.models import ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(encoder="mobilenetv2_050", decoder_channels=(16, 16, 16, 16))
    model = build_model(cfg).eval()
    ckpt = save_checkpoint(tmp_path / "live.pt", model, cfg)
    assert export_onnx(model, tmp_path / "live.onnx", 64, 64).passed
    return ckpt, tmp_path / "live.onnx"


def distill_process(domain_id: int, ns: str, store: Path, url: str, log: Path, **extra: Any) -> Any:
    """``python -m depthkd_ros.distill_node`` on ``domain_id`` with the test defaults."""
    args = [sys.executable, "-m", "depthkd_ros.distill_node", "--ros-args", "-r", f"__ns:=/{ns}",
            "-p", f"store_dir:={store}", "-p", f"teacher_url:={url}", "-p", "model_name:=ramp",
            "-p", f"token_file:={token_file(store.parent)}", "-p", "min_interval_s:=0.0",
            "-p", "status_period:=0.2", *[a for k, v in extra.items() for a in ("-p", f"{k}:={v}")]]
    env = {**os.environ, "ROS_DOMAIN_ID": str(domain_id), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def latest_status(cam: Camera, proc: Any, predicate: Callable[[dict], bool], what: str,
                  timeout: float = 30.0) -> dict:
    def check() -> dict | None:
        assert proc.poll() is None, f"distill_node exited with {proc.returncode}"
        return next((s for s in reversed(cam.status[-5:]) if predicate(s)), None)
    return wait_until(check, timeout=timeout, what=what)


# Fixtures for the test modules (imported by name): each module's DOMAIN_ID keeps parallel
# runs of the modules apart.
@pytest.fixture(scope="module")
def ros(request: pytest.FixtureRequest) -> Any:
    r = Ros(request.module.DOMAIN_ID)
    yield r
    r.close()


@pytest.fixture(scope="module")
def teacher_url() -> Any:
    with BackgroundServer(create_app(RampTeacher(), "ramp", token=TOKEN, max_wait_ms=0)) as url:
        yield url
