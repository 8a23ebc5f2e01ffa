"""Drive a real depth_node process from outside: play frames in, record outputs.

Serves `depthkd demo` and `depthkd bench-node`. The node runs as its own
process, exactly as `ros2 run depthkd_ros depth_node` starts it, so the
figures include DDS transport and serialisation; this side plays the camera
(Image + CameraInfo stamped with the wall clock) and records what comes back.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

from depthkd_core.geometry import Intrinsics
from depthkd_ros.conversions import (intrinsics_to_camera_info, rgb_to_compressed, rgb_to_image,
                                     stamp_ns)
from depthkd_ros.dds import profile_environments

WARM_UP_RETRY_S = 1.0  # a warm-up frame not answered on every topic by then is sent again
OUTPUT_TOPICS = {"depth": Image, "depth/camera_info": CameraInfo,
                 "depth/colored": Image, "points": PointCloud2}


def cdr_stamp_ns(serialized: bytes) -> int:
    """Stamp of a serialized message whose first field is a std_msgs/Header: CDR puts
    a 4-byte encapsulation header, then int32 sec and uint32 nanosec."""
    sec, nanosec = struct.unpack_from("<iI", serialized, 4)
    return sec * 1_000_000_000 + nanosec


@dataclass
class Received:
    """Outputs of recorded frames: messages per topic keyed by input stamp (with
    ``keep_messages``) and each one's latency (ms)."""

    messages: dict[str, dict[int, Any]] = field(default_factory=dict)
    latency_ms: dict[str, list[float]] = field(default_factory=dict)
    diagnostics: dict[str, str] = field(default_factory=dict)


class CameraPlayer(Node):
    """Publishes Image + CameraInfo like a camera driver; records the node's outputs.

    ``keep_messages=False`` keeps only latencies (long benchmark runs), and then
    subscribes to the serialized bytes: deserialising megabyte clouds in Python
    would measure this process, not the node (RViz, a C++ subscriber, pays far less).
    ``namespace`` is the camera's (topics are relative); ``transport`` ``compressed``
    publishes JPEG on ``image/compressed`` as image_transport does. Outputs of frames
    published with ``record=False`` (warm-up) are seen by ``wait_for_outputs`` but not
    recorded.
    """

    def __init__(self, context: Context, topics: tuple[str, ...] = tuple(OUTPUT_TOPICS),
                 keep_messages: bool = True, namespace: str = "", transport: str = "raw") -> None:
        super().__init__("depthkd_camera_player", context=context, namespace=namespace)
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                         reliability=ReliabilityPolicy.RELIABLE)
        self._compressed = {"raw": False, "compressed": True}[transport]
        self._image_pub = (self.create_publisher(CompressedImage, "image/compressed", qos)
                           if self._compressed else self.create_publisher(Image, "image", qos))
        self._info_pub = self.create_publisher(CameraInfo, "camera_info", qos)
        self.received = Received()
        self._keep = keep_messages
        self._recording: set[int] = set()
        self._seen: dict[str, set[int]] = {}
        self._arrived = threading.Condition()  # notified by every output
        for topic in topics:
            self.received.messages[topic] = {}
            self.received.latency_ms[topic] = []
            self._seen[topic] = set()
            self.create_subscription(OUTPUT_TOPICS[topic], topic,
                                     lambda msg, t=topic: self._on_output(t, msg), qos,
                                     raw=not keep_messages)
        self.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)

    def _on_output(self, topic: str, msg: Any) -> None:
        now = time.time_ns()
        stamp = stamp_ns(msg.header) if self._keep else cdr_stamp_ns(msg)
        with self._arrived:
            self._seen[topic].add(stamp)
            if stamp in self._recording:
                self.received.latency_ms[topic].append((now - stamp) / 1e6)
                if self._keep:
                    self.received.messages[topic][stamp] = msg
            self._arrived.notify_all()

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        # Keep the last period that processed frames: the final ones after playback are idle.
        for status in msg.status:
            if "depth estimation" in status.name and status.message == "running":
                with self._arrived:
                    self.received.diagnostics = {kv.key: kv.value for kv in status.values}

    def publish_frame(self, rgb: np.ndarray, K: Intrinsics, frame_id: str = "camera_optical",
                      record: bool = True) -> int:
        """Publish one frame stamped now; returns the stamp (ns) that identifies it."""
        now = time.time_ns()
        if record:
            with self._arrived:
                self._recording.add(now)
        image = rgb_to_compressed(rgb) if self._compressed else rgb_to_image(rgb, "rgb8")
        image.header.stamp.sec, image.header.stamp.nanosec = divmod(now, 1_000_000_000)
        image.header.frame_id = frame_id
        self._info_pub.publish(intrinsics_to_camera_info(K, image.header))
        self._image_pub.publish(image)
        return now

    def wait_for_outputs(self, stamps: list[int], timeout_s: float) -> bool:
        """Until every subscribed topic has brought an output of each of ``stamps``;
        False after ``timeout_s``."""
        wanted = set(stamps)
        with self._arrived:
            return self._arrived.wait_for(
                lambda: all(wanted <= seen for seen in self._seen.values()), timeout_s)

    def connected(self) -> bool:
        """True once the node subscribes to our image and publishes every output we record."""
        return (self._image_pub.get_subscription_count() > 0
                and all(self.count_publishers(t) > 0 for t in self.received.messages))


class NodeProcess:
    """A depth_node in its own process: start, wait for its topics, stop, peak memory."""

    def __init__(self, params: dict[str, Any], domain_id: int, log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        args = [sys.executable, "-m", "depthkd_ros.depth_node", "--ros-args"]
        for key, value in params.items():
            args += ["-p", f"{key}:={_ros_value(value)}"]
        env = {**os.environ, **(env or {}), "ROS_DOMAIN_ID": str(domain_id),
               "PYTHONUNBUFFERED": "1"}
        self._log = open(log_path, "w")  # closed in stop()
        self.process = subprocess.Popen(args, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        self.log_path = log_path
        self.peak_rss_mb = 0.0

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"depth_node exited with code {self.process.returncode}:\n"
                               + self.log_path.read_text()[-2000:])

    def sample_memory(self) -> float:
        """Peak resident set size (VmHWM) so far, MB; Linux /proc."""
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_mb = max(self.peak_rss_mb, int(line.split()[1]) / 1024)
        except OSError:
            pass
        return self.peak_rss_mb

    def cpu_seconds(self) -> float:
        """User + system CPU time of the node process so far (Linux /proc), NaN once gone."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.sample_memory()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def _ros_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class Session:
    """rclpy context + CameraPlayer spinning on a background thread + the node process.

    ``dds_profile`` (one of ``dds.PROFILE_MODES``): where config/fastdds.xml applies, as
    depth.launch.py gives it to the nodes it starts; Fast DDS's defaults lose fragments of
    messages above its 512 KB shared-memory segment (a preview image beside a cloud).
    """

    def __init__(self, node_params: dict[str, Any], domain_id: int, log_path: Path,
                 topics: tuple[str, ...] = tuple(OUTPUT_TOPICS), keep_messages: bool = True,
                 start_timeout_s: float = 60.0, dds_profile: str = "both") -> None:
        self.start_timeout_s = start_timeout_s
        node_env, own_env = profile_environments(dds_profile)
        self.context = Context()
        # Fast DDS reads its profile when this process's first participant is created;
        # restored afterwards for callers that go on (the tests).
        with mock.patch.dict(os.environ, own_env):
            rclpy.init(context=self.context, domain_id=domain_id)
            self.player = CameraPlayer(self.context, topics, keep_messages)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.player)
        self._spinner = threading.Thread(target=self._spin, daemon=True)
        self._spinner.start()
        self.node = NodeProcess(node_params, domain_id, log_path, node_env)
        try:
            self._wait_connected(start_timeout_s)
        except BaseException:
            self.close()
            raise

    def _spin(self) -> None:
        while self.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception:  # shutdown races end the thread quietly
                if not self.context.ok():
                    return
                raise

    def _wait_connected(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.player.connected():
            self.node.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"depth_node did not connect within {timeout_s:.0f} s; "
                                   f"log: {self.node.log_path}")
            time.sleep(0.1)

    def warm_up(self, rgb: np.ndarray, K: Intrinsics) -> None:
        """Publish unrecorded frames until one comes back on every recorded topic. DDS
        matches each direction on its own, and the node publishes a topic only once it
        counts a subscriber there: a frame played before that would lose outputs through no
        fault of the node's."""
        deadline = time.monotonic() + self.start_timeout_s
        while not self.player.wait_for_outputs([self.player.publish_frame(rgb, K, record=False)],
                                               WARM_UP_RETRY_S):
            self.node.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"depth_node did not answer a frame on every topic within "
                                   f"{self.start_timeout_s:.0f} s; log: {self.node.log_path}")

    def play(self, frames: list[np.ndarray], K: Intrinsics, rate_hz: float,
             duration_s: float | None = None, drain_s: float = 2.0) -> list[int]:
        """After ``warm_up``, publish frames at ``rate_hz`` (cycling for ``duration_s`` if
        given), then wait up to ``drain_s`` for their outputs; return their stamps.
        ``play_cpu_s`` is then the CPU time the node process spent meanwhile."""
        self.warm_up(frames[0], K)
        count = len(frames) if duration_s is None else max(1, int(round(duration_s * rate_hz)))
        period = 1.0 / rate_hz
        stamps = []
        cpu_start = self.node.cpu_seconds()
        start = time.perf_counter()
        for i in range(count):
            delay = start + i * period - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            stamps.append(self.player.publish_frame(frames[i % len(frames)], K))
            if i % 10 == 0:
                self.node.sample_memory()
                self.node.check_alive()
        self.player.wait_for_outputs(stamps, drain_s)  # frames the node dropped never come
        self.play_cpu_s = self.node.cpu_seconds() - cpu_start
        return stamps

    def close(self) -> None:
        self.node.stop()
        self.executor.shutdown(timeout_sec=1.0)
        self.player.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._spinner.join(timeout=2.0)


def default_domain_id() -> int:
    """ROS_DOMAIN_ID if set, else one in 60-99 derived from the pid so runs do not cross
    (ids above 101 put DDS ports into Linux's ephemeral range)."""
    env = os.environ.get("ROS_DOMAIN_ID")
    return int(env) if env else 60 + os.getpid() % 40


def latency_summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    arr = np.asarray(values)
    return {"count": int(arr.size), "mean_ms": float(arr.mean()),
            "p50_ms": float(np.percentile(arr, 50)), "p90_ms": float(np.percentile(arr, 90)),
            "max_ms": float(arr.max())}
