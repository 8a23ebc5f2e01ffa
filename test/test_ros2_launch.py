"""The package as a robot engineer runs it: ``colcon build``, then ``ros2 launch`` for real.

One colcon build per module into a temporary workspace; each launch file runs as
``ros2 launch depthkd_ros ...`` in its own process group on this module's ROS_DOMAIN_ID,
gets real frames (the bundled demo sequence) from this process's rclpy, and is stopped
as Ctrl-C in a terminal stops it (SIGINT to the group): exit 0, no process left behind.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

rclpy = pytest.importorskip("rclpy")

from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter_client import AsyncParameterClient

from depthkd_core.data import SimFolder
from depthkd_core.runtime import OnnxDepthModel
from depthkd_core.inference import DepthEstimator
from depthkd_ros.dds import PROFILE_VARIABLES
from depthkd_ros.tools.demo import PACKAGED_SEQUENCE
from depthkd_ros.depth_node import PARAMS
from depthkd_ros.depth_pipeline import PACKAGED_MODEL
from depthkd_ros.tools.harness import CameraPlayer
from helpers import FASTDEPTH, ros_domain, wait_until
from ros_launch import REPO, Workspace, needs_ros_tools

pytestmark = [pytest.mark.ros, needs_ros_tools]
DOMAIN_ID = ros_domain(45)  # unique per test module so parallel runs never cross
START_S = 60.0  # a cold node start (rclpy, onnxruntime, DDS discovery) on 2 busy cores
YAML = yaml.safe_load((REPO / "config" / "depth.yaml").read_text())["/**"]["ros__parameters"]
TYPES = {"depth": "sensor_msgs/msg/Image", "depth/camera_info": "sensor_msgs/msg/CameraInfo",
         "depth/colored": "sensor_msgs/msg/Image", "points": "sensor_msgs/msg/PointCloud2",
         "camera_info": "sensor_msgs/msg/CameraInfo"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("colcon_ws"), DOMAIN_ID)


@pytest.fixture(scope="module")
def frames() -> tuple[list[np.ndarray], Any]:
    sequence = list(SimFolder(PACKAGED_SEQUENCE))[:5]
    return [f.rgb for f in sequence], sequence[0].intrinsics


class Rcl:
    """This process's side of the graph: camera players and parameter clients."""

    def __init__(self) -> None:
        self.context = Context()
        rclpy.init(context=self.context, domain_id=DOMAIN_ID)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.node = rclpy.create_node("launch_test_probe", context=self.context)
        self.executor.add_node(self.node)
        self._clients: dict[str, AsyncParameterClient] = {}
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def player(self, namespace: str = "", transport: str = "raw") -> CameraPlayer:
        player = CameraPlayer(self.context, namespace=namespace, transport=transport)
        self.executor.add_node(player)
        return player

    def drop(self, player: CameraPlayer) -> None:
        self.executor.remove_node(player)
        player.destroy_node()

    def parameters(self, node: str) -> dict[str, Any]:
        """Every parameter of ``node`` with its value, through its parameter services."""
        # One client per node name, kept: its service clients go with the probe node.
        client = self._clients.setdefault(node, AsyncParameterClient(self.node, node))
        assert client.wait_for_services(timeout_sec=START_S), f"{node} parameter services"
        names = _result(client.list_parameters()).result.names
        values = _result(client.get_parameters(names)).values
        return {n: getattr(v, _VALUE_FIELDS[v.type]) for n, v in zip(names, values)}

    def topics(self) -> dict[str, list[str]]:
        return dict(self.node.get_topic_names_and_types())

    def nodes(self) -> set[str]:
        return {f"{ns.rstrip('/')}/{name}" for name, ns in
                self.node.get_node_names_and_namespaces()}

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.shutdown(context=self.context)
        self.thread.join(timeout=5.0)


_VALUE_FIELDS = {1: "bool_value", 2: "integer_value", 3: "double_value", 4: "string_value"}


def _result(future: Any) -> Any:
    wait_until(future.done, timeout=10.0, what="a parameter service reply")
    return future.result()


@pytest.fixture(scope="module")
def rcl() -> Any:
    side = Rcl()
    yield side
    side.close()


def _feed_until_outputs(launch: Any, player: CameraPlayer, frames: tuple[list, Any]) -> set[int]:
    """Play frames until each output topic has one back (the first frames can precede
    discovery in both directions, so one frame per poll, never a fixed sleep); the stamps sent."""
    images, K = frames
    sent: list[int] = []

    def outputs() -> bool:
        launch.running()
        if player.connected():
            sent.append(player.publish_frame(images[len(sent) % len(images)], K))
        return all(player.received.messages[t] for t in player.received.messages)
    wait_until(outputs, timeout=START_S, interval=0.2, what="every output of depth_node")
    return set(sent)


def _check_outputs(player: CameraPlayer, K: Any, sent: set[int]) -> None:
    """Depth at the camera resolution, in metres, stamped like its input; an organized cloud
    on the network's grid (cloud_resolution model, the default)."""
    assert all(set(player.received.messages[t]) <= sent for t in player.received.messages)
    depth = next(iter(player.received.messages["depth"].values()))
    assert (depth.encoding, depth.height, depth.width) == ("32FC1", K.height, K.width)
    values = np.frombuffer(bytes(depth.data), np.float32)
    assert np.isfinite(values).mean() > 0.9 and 0.1 <= np.nanmedian(values) <= 10.0
    cloud = next(iter(player.received.messages["points"].values()))
    network = DepthEstimator(OnnxDepthModel(PACKAGED_MODEL)).network_size(K.height, K.width)
    assert (cloud.height, cloud.width) == network != (K.height, K.width)


def _node_environment(launch: Any, executable: str) -> dict[str, str]:
    """The environment launch gave the process of ``executable`` (from its logged pid)."""
    match = re.search(rf"\[{executable}-\d+\]: process started with pid \[(\d+)\]",
                      launch.output())
    assert match, launch.output()[-2000:]
    raw = Path(f"/proc/{match.group(1)}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def _check_node(rcl: Rcl, namespace: str, transport: str) -> None:
    topics = rcl.topics()
    ns = namespace.rstrip("/")
    for topic, kind in TYPES.items():
        assert topics.get(f"{ns}/{topic}") == [kind], (topic, topics)
    image = (f"{ns}/image/compressed", "sensor_msgs/msg/CompressedImage") if (
        transport == "compressed") else (f"{ns}/image", "sensor_msgs/msg/Image")
    assert topics.get(image[0]) == [image[1]]
    assert rcl.node.count_subscribers(image[0]) == 1
    assert topics.get("/diagnostics") == ["diagnostic_msgs/msg/DiagnosticArray"]
    params = rcl.parameters(f"{ns}/depth_node")
    expected = {**YAML, "input_transport": transport}
    assert {spec.name: params[spec.name] for spec in PARAMS} == expected


def test_default_launch(workspace: Workspace, rcl: Rcl, frames: tuple, tmp_path: Path) -> None:
    """No arguments: one /depth_node with config/depth.yaml and the packaged student."""
    with workspace.launch("depth.launch.py", log=tmp_path / "launch.log") as launch:
        player = rcl.player()
        try:
            _check_outputs(player, frames[1], _feed_until_outputs(launch, player, frames))
            _check_node(rcl, "", "raw")
            assert "/depth_node" in rcl.nodes()
            # The colcon-installed package runs (its packaged model), not the checkout.
            diagnostics = wait_until(lambda: player.received.diagnostics, what="diagnostics")
            assert Path(diagnostics["model_path"]).is_relative_to(workspace.install)
            # Without a profile of the user's, the node gets the installed one.
            env = _node_environment(launch, "depth_node")
            if not any(workspace.env.get(v) for v in PROFILE_VARIABLES):
                profile = Path(env["FASTDDS_DEFAULT_PROFILES_FILE"])
                assert profile == (workspace.install / "depthkd_ros" / "share" / "depthkd_ros"
                                   / "config" / "fastdds.xml") and profile.is_file()
        finally:
            rcl.drop(player)
        launch.interrupt()
    wait_until(lambda: "/depth_node" not in rcl.nodes(), what="/depth_node to leave the graph")


def test_two_namespaced_cameras_with_compressed_input(workspace: Workspace, rcl: Rcl,
                                                      frames: tuple, tmp_path: Path) -> None:
    with workspace.launch("depth.launch.py", "cameras:=front,rear", "input_transport:=compressed",
                          log=tmp_path / "launch.log") as launch:
        players = [rcl.player(ns, "compressed") for ns in ("front", "rear")]
        try:
            for player, ns in zip(players, ("/front", "/rear")):
                _check_outputs(player, frames[1], _feed_until_outputs(launch, player, frames))
                _check_node(rcl, ns, "compressed")
            assert {"/front/depth_node", "/rear/depth_node"} <= rcl.nodes()
            assert "/depth" not in rcl.topics()  # nothing outside the camera namespaces
        finally:
            for player in players:
                rcl.drop(player)
        launch.interrupt()


def test_rviz_true_without_rviz2_fails_before_starting_anything(workspace: Workspace, rcl: Rcl,
                                                                 tmp_path: Path) -> None:
    prefixes = workspace.env.get("AMENT_PREFIX_PATH", "").split(":")
    if any((Path(p) / "share" / "ament_index" / "resource_index" / "packages" / "rviz2").is_file()
           for p in prefixes if p):
        pytest.skip("rviz2 is installed here: the missing-rviz2 path cannot be exercised")
    with workspace.launch("depth.launch.py", "camera:=viz", "rviz:=true",
                          log=tmp_path / "launch.log") as launch:
        code = launch.process.wait(timeout=START_S)
        output = launch.output()
        assert code != 0, output
        assert "rviz:=true needs RViz 2" in output and "nothing was started" in output, output
        assert "process started" not in output, output
        # An orphaned depth_node would still be in launch's process group.
        wait_until(lambda: not launch.group_alive(), what="launch's process group to be empty")
    assert "/viz/depth_node" not in rcl.nodes()


def _free_port() -> int:
    with socket.socket() as probe:  # parallel runs must not collide on a fixed port
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _teacher_server(workspace: Workspace, port: int, log: Path) -> Any:
    """teacher_server.launch.py serving FastDepth on loopback, once it answers ready."""
    from depthkd_core.serving.client import TeacherClient

    launch = workspace.launch("teacher_server.launch.py", f"teacher:={FASTDEPTH}",
                              f"port:={port}", log=log)
    with TeacherClient(f"http://127.0.0.1:{port}", "teacher", retries=0) as client:
        wait_until(lambda: launch.running() and client.ready(), timeout=START_S, interval=0.2,
                   what="teacher_server to be ready")
    return launch


@pytest.mark.needs_shared
def test_teacher_server_launch_serves_the_teacher(workspace: Workspace, tmp_path: Path) -> None:
    from depthkd_core.serving.client import TeacherClient

    port = _free_port()
    with _teacher_server(workspace, port, tmp_path / "launch.log") as launch, \
            TeacherClient(f"http://127.0.0.1:{port}", "teacher", retries=0) as client:
        depth = client.infer(np.random.default_rng(0).random((1, 3, 224, 224), np.float32))
        assert depth.shape == (1, 1, 224, 224) and np.isfinite(depth).all()
        launch.interrupt()


@pytest.mark.needs_shared
def test_distill_true_labels_keyframes_with_the_launched_teacher(
        workspace: Workspace, rcl: Rcl, frames: tuple, tmp_path: Path) -> None:
    """distill:=true beside a real teacher_server: keyframes from real frames come back
    labelled over HTTP (no fine-tuning round: that needs min_new_keyframes)."""
    from std_msgs.msg import String

    port = _free_port()
    statuses: list[dict[str, Any]] = []
    with _teacher_server(workspace, port, tmp_path / "teacher.log") as teacher, \
            workspace.launch("depth.launch.py", "camera:=cam", "distill:=true",
                             f"teacher_url:=http://127.0.0.1:{port}",
                             f"store_dir:={tmp_path / 'store'}",
                             log=tmp_path / "launch.log") as launch:
        player = rcl.player("cam")
        listener = rcl.node.create_subscription(String, "/cam/distill/status",
                                                lambda m: statuses.append(json.loads(m.data)), 10)
        try:
            _feed_until_outputs(launch, player, frames)  # depth_node works beside it
            images, K = frames
            sent = iter(range(10**6))

            def labelled() -> bool:
                launch.running()
                player.publish_frame(images[next(sent) % len(images)], K)
                return bool(statuses) and statuses[-1]["labelled"] >= 1
            wait_until(labelled, timeout=START_S, interval=0.2,
                       what=f"a keyframe labelled by the teacher (status {statuses[-1:]})")
            assert statuses[-1]["teacher_failures"] == 0 and statuses[-1]["breaker"] == "closed"
            assert (tmp_path / "store" / "cam").is_dir()
            assert {"/cam/depth_node", "/cam/distill_node"} <= rcl.nodes()
        finally:
            rcl.node.destroy_subscription(listener)
            rcl.drop(player)
        launch.interrupt()
        teacher.interrupt()
