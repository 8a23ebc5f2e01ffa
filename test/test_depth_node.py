"""depth_node with real rclpy and real DDS: real messages in, real messages out.

Three nodes share one executor thread: ``/ramp`` and ``/jpeg`` run a tiny ONNX
model whose output is known per pixel (depth = 1 + 4 * red), ``/fast`` runs the
real FastDepth model for hot-swap and drop tests.
"""

from __future__ import annotations

import copy
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytestmark = pytest.mark.ros

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.context import Context
from rclpy.exceptions import InvalidParameterValueException
from rclpy.executors import SingleThreadedExecutor
from rcl_interfaces.msg import SetParametersResult
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

from depthkd_core.geometry import Intrinsics, colorize_depth
from depthkd_ros.conversions import (COLOR_ENCODINGS, camera_info_to_intrinsics,
                                     compressed_to_rgb, depth_image_to_numpy, image_to_numpy,
                                     image_to_rgb, numpy_to_image,
                                     pointcloud2_to_numpy, rgb_to_compressed, rgb_to_image,
                                     stamp_ns)
from depthkd_core.runtime import OnnxDepthModel
from depthkd_core.inference import (DepthEstimator, EstimatorConfig,
                                    build_point_cloud)
from depthkd_ros.conversions import points_to_pointcloud2
from depthkd_ros.depth_node import DepthNode
from depthkd_ros.depth_pipeline import cloud_message, sample_frames
from depthkd_ros.node_params import matching_reliability
from helpers import (ros_domain, wait_until, write_bright_nan_onnx, write_conv_stack_onnx,
                     write_linear_onnx)

DOMAIN_ID = ros_domain(47)  # unique per test module so parallel runs never cross
REPO = Path(__file__).resolve().parents[1]
QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
H, W = 48, 64
K = Intrinsics(fx=60.0, fy=62.0, cx=31.5, cy=23.5, width=W, height=H)
MIN_D, MAX_D = 1.5, 4.0
_stamps = itertools.count(1)



class Harness:
    """Test publisher + subscriber in the depth node's namespace."""

    def __init__(self, context: Context, executor: SingleThreadedExecutor, node: DepthNode,
                 outputs: tuple[str, ...]) -> None:
        ns = node.get_namespace()
        self.depth_node = node
        self.node = rclpy.create_node(f"harness{ns.replace('/', '_')}", namespace=ns,
                                      context=context)
        self.image = self.node.create_publisher(Image, "image", QOS)
        self.compressed = self.node.create_publisher(CompressedImage, "image/compressed", QOS)
        self.info = self.node.create_publisher(CameraInfo, "camera_info", QOS)
        self.camera_info: CameraInfo | None = None
        self.cond = threading.Condition()
        self.msgs: dict[str, list] = defaultdict(list)
        kinds = {"depth": Image, "depth/camera_info": CameraInfo, "points": PointCloud2,
                 "depth/colored": Image}
        for topic in outputs:
            self.subscribe(topic, kinds[topic])
        executor.add_node(self.node)

    def subscribe(self, topic: str, kind: type) -> None:
        self.node.create_subscription(kind, topic, partial(self._store, topic), QOS)

    def _store(self, topic: str, msg: Any) -> None:
        with self.cond:
            self.msgs[topic].append(msg)
            self.cond.notify_all()

    def set_camera_info(self, info: CameraInfo) -> None:
        """Send every following frame with this camera_info, stamped like the frame as a
        driver does; published now until the node holds it."""
        self.camera_info = info

        def held() -> bool:
            self.info.publish(info)
            return self.depth_node._infos.latest() == info  # test hook
        wait_until(held, what="camera_info to arrive")

    def send(self, msg: Image | CompressedImage, info_stamp_offset_ns: int = 0) -> tuple[int, int]:
        """Publish the camera_info (stamp offset by ``info_stamp_offset_ns``), then the frame."""
        msg.header.frame_id = "camera_optical_frame"
        msg.header.stamp.sec, msg.header.stamp.nanosec = 1000 + next(_stamps), 4242
        if self.camera_info is not None:
            info = copy.deepcopy(self.camera_info)
            info.header.frame_id = msg.header.frame_id
            info.header.stamp.sec, info.header.stamp.nanosec = divmod(
                stamp_ns(msg.header) + info_stamp_offset_ns, 1_000_000_000)
            self.info.publish(info)
        (self.image if isinstance(msg, Image) else self.compressed).publish(msg)
        return msg.header.stamp.sec, msg.header.stamp.nanosec

    def wait(self, topic: str, stamp: tuple[int, int], timeout: float = 10.0,
             newer: bool = False) -> Any:
        """The ``topic`` message with this stamp (or, ``newer``, the first one after it)."""
        def find() -> Any:
            return next((m for m in self.msgs[topic]
                         if (m.header.stamp.sec, m.header.stamp.nanosec) > stamp
                         or (not newer and (m.header.stamp.sec, m.header.stamp.nanosec) == stamp)),
                        None)
        with self.cond:
            if not self.cond.wait_for(find, timeout):
                raise AssertionError(f"no {topic} for stamp {stamp} within {timeout} s; "
                                     f"node stats {self.depth_node.stats.snapshot()}")
            return find()


def _send_until_back(h: Harness, topic: str, send: Callable[[], tuple[int, int]]) -> Any:
    """Send frames until one comes back on ``topic``: right after a subscription is
    (re)created the first frames can precede discovery. One frame per poll."""
    stamps: list[tuple[int, int]] = []

    def back() -> Any:
        stamps.append(send())
        with h.cond:
            return next((m for m in h.msgs[topic]
                         if (m.header.stamp.sec, m.header.stamp.nanosec) in stamps), None)
    return wait_until(back, interval=0.2, what=f"a frame back on {topic}")


def _info(K: Intrinsics) -> CameraInfo:
    info = CameraInfo(width=K.width, height=K.height)
    info.k = K.matrix().ravel().tolist()
    return info


def _frame(seed: int = 0) -> np.ndarray:
    """Red rises left to right (depth 1..5 m through the ramp model); pairs share colour."""
    rng = np.random.default_rng(seed)
    rgb = np.repeat(rng.integers(0, 256, (H, W // 2, 3), dtype=np.uint8), 2, axis=1)
    rgb[..., 0] = (np.arange(W) // 2 * 8).astype(np.uint8)[None, :]
    return rgb


def _expected_depth(rgb: np.ndarray) -> np.ndarray:
    depth = 1.0 + 4.0 * rgb[..., 0].astype(np.float32) / 255.0
    depth[(depth < MIN_D) | (depth > MAX_D)] = np.nan
    return depth


def _backproject(depth: np.ndarray, info: CameraInfo, step: int = 1) -> np.ndarray:
    """Hand-written pinhole back-projection of pixels (step*i, step*j)."""
    Kc = np.asarray(info.k).reshape(3, 3)
    v, u = np.mgrid[0:depth.shape[0]:step, 0:depth.shape[1]:step]
    z = depth[v, u]
    return np.stack([(u - Kc[0, 2]) * z / Kc[0, 0], (v - Kc[1, 2]) * z / Kc[1, 1], z], axis=-1)


@pytest.fixture(scope="module")
def ros(tmp_path_factory: pytest.TempPathFactory) -> Any:
    models = tmp_path_factory.mktemp("models")
    ramp = write_linear_onnx(models / "ramp.onnx", 4.0, 1.0)
    context = Context()
    rclpy.init(context=context, domain_id=DOMAIN_ID)
    executor = SingleThreadedExecutor(context=context)
    common = [Parameter("model_path", value=str(ramp)), Parameter("min_depth", value=MIN_D),
              Parameter("max_depth", value=MAX_D), Parameter("model_input_height", value=H),
              Parameter("model_input_width", value=W), Parameter("diagnostics_period", value=0.3)]
    nodes = {"ramp": DepthNode(context=context, namespace="ramp", parameter_overrides=common),
             "jpeg": DepthNode(context=context, namespace="jpeg", parameter_overrides=common + [
                 Parameter("input_transport", value="compressed")])}
    # a fixed-size model that takes real time per frame (the newest-frame and hot-swap tests)
    slow = write_conv_stack_onnx(models / "slow.onnx", (224, 224))
    nodes["fast"] = DepthNode(context=context, namespace="fast", parameter_overrides=[
        Parameter("model_path", value=str(slow)), Parameter("output_resolution", value="model"),
        Parameter("model_input_height", value=224), Parameter("model_input_width", value=224)])
    for node in nodes.values():
        executor.add_node(node)
    harness = {"ramp": Harness(context, executor, nodes["ramp"],
                               ("depth", "depth/camera_info", "points")),
               "jpeg": Harness(context, executor, nodes["jpeg"], ("depth", "points"))}
    if "fast" in nodes:
        harness["fast"] = Harness(context, executor, nodes["fast"], ("depth", "depth/camera_info"))
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    for name, h in harness.items():
        # input_reliability auto: the harness publishes reliable, so the inputs switch once.
        wait_until(lambda n=nodes[name]: all(i.reliability == "reliable"
                                             for i in n._inputs),
                   what=f"{name} inputs to match the reliable publishers")
        wait_until(lambda h=h: (h.image.get_subscription_count()
                                + h.compressed.get_subscription_count())
                   and h.info.get_subscription_count(), what=f"{name} discovery")
        wait_until(lambda n=nodes[name]: n._pubs["depth"].get_subscription_count(),
                   what=f"{name} depth subscriber")
    harness["ramp"].set_camera_info(_info(K))
    harness["jpeg"].set_camera_info(_info(K))
    yield {"nodes": nodes, "harness": harness, "models": models, "executor": executor,
           "context": context}
    executor.shutdown()
    for node in nodes.values():
        node.destroy_node()
    for h in harness.values():
        h.node.destroy_node()
    rclpy.shutdown(context=context)
    thread.join(timeout=5.0)


@pytest.mark.parametrize("encoding", [e for e in COLOR_ENCODINGS if e not in ("uyvy", "yuyv")])
def test_every_encoding_gives_depth_info_and_cloud(ros: Any, encoding: str) -> None:
    h: Harness = ros["harness"]["ramp"]
    sent = rgb_to_image(_frame(), encoding)
    stamp = h.send(sent)
    depth_msg = h.wait("depth", stamp)
    info_msg = h.wait("depth/camera_info", stamp)
    cloud_msg = h.wait("points", stamp)
    for msg in (depth_msg, info_msg, cloud_msg):
        assert msg.header == sent.header
    decoded = image_to_rgb(sent)
    if encoding != "mono8":  # grey has no red channel to compare
        tolerance = 6 if encoding.startswith("yuv") else 0  # 4:2:2 chroma rounding
        assert np.abs(decoded[..., 0].astype(int) - _frame()[..., 0]).max() <= tolerance
    assert depth_msg.encoding == "32FC1" and (depth_msg.height, depth_msg.width) == (H, W)
    depth = depth_image_to_numpy(depth_msg)
    np.testing.assert_allclose(depth, _expected_depth(decoded), rtol=1e-5)
    assert np.isnan(depth).any() and np.isfinite(depth).any()  # clipping at both ends happened
    assert camera_info_to_intrinsics(info_msg) == K
    points, colors = pointcloud2_to_numpy(cloud_msg)
    assert (cloud_msg.height, cloud_msg.width, cloud_msg.is_dense) == (H, W, False)
    np.testing.assert_allclose(points, _backproject(depth, info_msg), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(colors, decoded)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_compressed_transport(ros: Any, fmt: str) -> None:
    h: Harness = ros["harness"]["jpeg"]
    sent = rgb_to_compressed(_frame(1), fmt)
    stamp = h.send(sent)
    depth_msg = h.wait("depth", stamp)
    assert depth_msg.header == sent.header
    depth = depth_image_to_numpy(depth_msg)
    np.testing.assert_allclose(depth, _expected_depth(compressed_to_rgb(sent)), rtol=1e-5)
    assert h.wait("points", stamp).header == sent.header


def test_decimation_clipping_and_rejected_values(ros: Any) -> None:
    node: DepthNode = ros["nodes"]["ramp"]
    h: Harness = ros["harness"]["ramp"]
    ok = node.set_parameters([Parameter("cloud_decimation", value=3),
                              Parameter("max_depth", value=3.0)])
    assert all(r.successful for r in ok)
    try:
        stamp = h.send(rgb_to_image(_frame(2)))
        depth = depth_image_to_numpy(h.wait("depth", stamp))
        cloud = h.wait("points", stamp)
        assert (cloud.height, cloud.width) == (16, 22)  # ceil(48/3), ceil(64/3)
        points, _ = pointcloud2_to_numpy(cloud)
        np.testing.assert_allclose(points, _backproject(depth, h.wait("depth/camera_info", stamp),
                                                        step=3), rtol=1e-5, atol=1e-6)
        valid = depth[np.isfinite(depth)]
        assert valid.min() >= MIN_D and valid.max() <= 3.0
        assert np.isnan(points[..., 2]).any()
    finally:
        node.set_parameters([Parameter("cloud_decimation", value=1),
                             Parameter("max_depth", value=MAX_D)])
    bad = node.set_parameters([Parameter("min_depth", value=5.0)])[0]
    assert not bad.successful and "min_depth" in bad.reason
    out_of_range = node.set_parameters([Parameter("cloud_decimation", value=0)])[0]
    assert not out_of_range.successful
    read_only = node.set_parameters([Parameter("providers", value="cuda")])[0]
    assert not read_only.successful


def test_colored_only_when_subscribed(ros: Any) -> None:
    node: DepthNode = ros["nodes"]["ramp"]
    h: Harness = ros["harness"]["ramp"]
    h.wait("depth", h.send(rgb_to_image(_frame(3))))
    assert node.stats.snapshot()["published"]["colored"] == 0  # nobody listened
    h.subscribe("depth/colored", Image)
    wait_until(lambda: node._pubs["colored"].get_subscription_count(),
               what="colored subscriber")
    stamp = h.send(rgb_to_image(_frame(3)))
    colored = h.wait("depth/colored", stamp)
    assert colored.encoding == "bgr8" and colored.header.stamp.sec == stamp[0]
    depth = depth_image_to_numpy(h.wait("depth", stamp))
    expected_rgb = colorize_depth(depth, MIN_D, MAX_D)
    np.testing.assert_array_equal(image_to_numpy(colored)[..., ::-1], expected_rgb)


def test_sparse_lsq_alignment(ros: Any) -> None:
    overrides = [Parameter("model_path", value=str(ros["models"] / "ramp.onnx")),
                 Parameter("alignment", value="lsq"), Parameter("min_depth", value=0.1),
                 Parameter("max_depth", value=20.0)]
    node = DepthNode(context=ros["context"], namespace="sparse", parameter_overrides=overrides)
    ros["executor"].add_node(node)
    h = Harness(ros["context"], ros["executor"], node, ("depth",))
    sparse_pub = h.node.create_publisher(Image, "sparse_depth", QOS)
    try:
        wait_until(lambda: sparse_pub.get_subscription_count()
                   and node._pubs["depth"].get_subscription_count(),
                   what="sparse node discovery")
        h.set_camera_info(_info(K))
        rgb = _frame(7)
        _expect_skip(node, lambda: h.send(rgb_to_image(rgb)), "needs sparse metric depth")
        pred = 1.0 + 4.0 * rgb[..., 0].astype(np.float64) / 255.0
        mm = np.zeros((H, W), np.uint16)  # 16UC1 millimetres, 0 = no return
        ys, xs = np.mgrid[2:H:6, 3:W:7]
        mm[ys, xs] = np.round((2.0 * pred[ys, xs] + 0.5) * 1000.0).astype(np.uint16)
        sparse = numpy_to_image(mm, "16UC1")
        wait_until(lambda: sparse_pub.publish(sparse) or node._sparse == sparse,
                   what="sparse depth to arrive")
        depth = depth_image_to_numpy(h.wait("depth", h.send(rgb_to_image(rgb))))
        # Millimetre rounding of the reference limits the fit to about 1e-3.
        np.testing.assert_allclose(depth, 2.0 * pred + 0.5, rtol=2e-3)
    finally:
        ros["executor"].remove_node(node)
        ros["executor"].remove_node(h.node)
        node.destroy_node()
        h.node.destroy_node()


def _expect_skip(node: DepthNode, action: Callable[[], None], reason: str) -> None:
    before = node.stats.snapshot()["skipped"]
    action()
    wait_until(lambda: node.stats.snapshot()["skipped"] == before + 1, what=f"skip ({reason})")
    assert reason in node.stats.snapshot()["last_error"]


def test_bad_inputs_leave_node_alive(ros: Any) -> None:
    node: DepthNode = ros["nodes"]["ramp"]
    h: Harness = ros["harness"]["ramp"]
    good = rgb_to_image(_frame(4))
    unknown = Image(height=H, width=W, encoding="bayer_rggb8", step=W, data=bytes(H * W))
    truncated = rgb_to_image(_frame(4))
    truncated.data = bytes(good.data)[: len(good.data) // 2]
    short_step = rgb_to_image(_frame(4))
    short_step.step = W
    _expect_skip(node, lambda: h.send(unknown), "bayer_rggb8")
    _expect_skip(node, lambda: h.send(truncated), "truncated")
    _expect_skip(node, lambda: h.send(short_step), "shorter than")
    h.set_camera_info(CameraInfo(width=W, height=H))
    _expect_skip(node, lambda: h.send(rgb_to_image(_frame(4))), "fx=0")
    h.set_camera_info(_info(K.scaled(32, 24)))
    _expect_skip(node, lambda: h.send(rgb_to_image(_frame(4))), "intrinsics are for 32x24")
    h.set_camera_info(_info(K))
    assert h.wait("depth", h.send(good)).header == good.header

    jnode: DepthNode = ros["nodes"]["jpeg"]
    j: Harness = ros["harness"]["jpeg"]
    jpeg = rgb_to_compressed(_frame(4), "jpeg")
    _expect_skip(jnode, lambda: j.send(CompressedImage(format="jpeg", data=b"\xff\xd8garbage")),
                 "truncated JPEG")
    _expect_skip(jnode, lambda: j.send(CompressedImage(format="jpeg", data=b"nonsense" * 20)),
                 "could not be decoded")
    assert j.wait("depth", j.send(jpeg)).header == jpeg.header


def test_absurd_intrinsics_skip_the_frame_and_are_counted(ros: Any) -> None:
    """fx = fy = 1e-30 or cx/cy = +-1e38 are finite and positive, and made a "valid" cloud
    with points 1e32 m away; now the frame is skipped as with no camera_info, and counted."""
    node: DepthNode = ros["nodes"]["ramp"]
    h: Harness = ros["harness"]["ramp"]
    before = node.stats.snapshot()
    try:
        for absurd, reason in ((Intrinsics(1e-30, 1e-30, K.cx, K.cy, W, H), "fx=1e-30 is"),
                               (Intrinsics(K.fx, K.fy, 1e38, -1e38, W, H), "cx=1e+38 is"),
                               (Intrinsics(K.fx, K.fy, K.cx, -1e38, W, H), "cy=-1e+38 is")):
            h.set_camera_info(_info(absurd))
            _expect_skip(node, lambda: h.send(rgb_to_image(_frame(4))), reason)
    finally:
        h.set_camera_info(_info(K))
    after = node.stats.snapshot()
    assert after["camera_info"]["implausible"] - before["camera_info"]["implausible"] == 3
    assert after["published"]["points"] == before["published"]["points"]
    assert "camera_info refused" in after["last_error"]
    assert h.wait("depth", h.send(rgb_to_image(_frame(4)))).header.frame_id


def test_hot_swap_judges_the_model_on_real_frames(ros: Any) -> None:
    """A model finite on a black frame but NaN on real ones (red > 0.5) was swapped in by the
    black-frame dry run, and every frame was skipped after; now it is refused with the reason,
    judged on the last received frames, or on the bundled demo frame before any arrived."""
    node: DepthNode = ros["nodes"]["ramp"]
    h: Harness = ros["harness"]["ramp"]
    bright_nan = write_bright_nan_onnx(ros["models"] / "bright_nan.onnx")
    h.wait("depth", h.send(rgb_to_image(_frame(4))))  # red up to 248 of 255
    result = node.set_parameters([Parameter("model_path", value=str(bright_nan))])[0]
    assert not result.successful
    assert "judged on the last received frames" in result.reason and "NaN/inf" in result.reason
    assert node.get_parameter("model_path").value.endswith("ramp.onnx")
    assert h.wait("depth", h.send(rgb_to_image(_frame(4)))).header.frame_id  # old model runs
    with pytest.raises(ValueError, match="judged on the bundled sample frame: .* NaN/inf"):
        DepthNode(context=ros["context"], namespace="fresh", parameter_overrides=[
            Parameter("model_path", value=str(bright_nan))])


def test_a_change_another_validator_refuses_is_never_committed(ros: Any) -> None:
    """on-set validates, post-set commits: a model another on-set callback refuses after
    ours accepted it must not go live (it did while ours swapped as it validated)."""
    refused = write_linear_onnx(ros["models"] / "refused.onnx", 0.0, 7.0)

    class Guarded(DepthNode):
        def _setup(self) -> None:
            # registered first, so rclpy calls it after the node's own validator
            self.add_on_set_parameters_callback(lambda params: SetParametersResult(
                successful=not any(str(p.value).endswith("refused.onnx") for p in params),
                reason="site policy"))
            super()._setup()

    node = Guarded(context=ros["context"], namespace="guarded")
    try:
        before = node._pipeline
        result = node.set_parameters([Parameter("model_path", value=str(refused))])[0]
        assert not result.successful and result.reason == "site policy"
        assert node._pipeline is before and not node._pipeline.model_path.endswith("refused.onnx")
    finally:
        node.destroy_node()


def test_diagnostics(ros: Any) -> None:
    h: Harness = ros["harness"]["ramp"]
    h.subscribe("/diagnostics", DiagnosticArray)
    h.wait("depth", h.send(rgb_to_image(_frame(5))))

    def ours() -> dict[str, str] | None:
        with h.cond:
            for array in h.msgs["/diagnostics"]:
                for status in array.status:
                    if status.name.startswith("/ramp/depth_node"):
                        return {kv.key: kv.value for kv in status.values}
        return None
    values = wait_until(ours, what="/diagnostics from /ramp/depth_node")
    assert {"rate_hz", "inference_ms", "total_ms", "dropped_frames", "provider",
            "model_path", "camera_info_implausible"} <= set(values)
    assert values["provider"] == "CPUExecutionProvider"
    assert values["model_path"].endswith("ramp.onnx")


def _scene_rgb() -> np.ndarray:
    """A bundled indoor frame (the demo sequence's first), as a camera would send it."""
    return sample_frames()[0]


def test_counters_add_up_with_and_without_subscribers(ros: Any) -> None:
    """received = processed + dropped + skipped + unwanted: frames taken while no output
    has a subscriber were in no counter before (issue 11)."""
    ramp = ros["models"] / "ramp.onnx"
    node = DepthNode(context=ros["context"], namespace="quiet", parameter_overrides=[
        Parameter("model_path", value=str(ramp)), Parameter("model_input_height", value=H),
        Parameter("model_input_width", value=W)])
    ros["executor"].add_node(node)
    h = Harness(ros["context"], ros["executor"], node, ())
    try:
        wait_until(lambda: h.image.get_subscription_count(), what="/quiet discovery")
        h.set_camera_info(_info(K))

        def settled(received: int) -> dict[str, Any] | None:
            t = node.stats.snapshot()
            parts = t["processed"] + t["dropped"] + t["skipped"] + t["unwanted"]
            return t if t["received"] == received == parts else None

        for seed in range(4):  # nobody subscribes to any output
            h.send(rgb_to_image(_frame(seed)))
        before = wait_until(lambda: settled(4), what="4 unwanted frames counted")
        assert before["processed"] == before["skipped"] == 0 and before["unwanted"] >= 1
        h.subscribe("depth", Image)
        wait_until(lambda: node._pubs["depth"].get_subscription_count(),
                   what="depth subscriber")
        h.wait("depth", h.send(rgb_to_image(_frame(9))))
        bad = rgb_to_image(_frame(10))
        bad.encoding = "theora"
        h.send(bad)
        after = wait_until(lambda: settled(6), what="6 frames counted")
        assert after["processed"] >= 1 and after["skipped"] == 1
        assert after["unwanted"] == before["unwanted"]
    finally:
        ros["executor"].remove_node(h.node)
        ros["executor"].remove_node(node)
        h.node.destroy_node()
        node.destroy_node()


def test_camera_info_pairs_with_its_frame_by_stamp(ros: Any) -> None:
    """Each image gets the camera_info of its stamp (not the newest one), within
    camera_info_tolerance and with the same frame_id; otherwise it is skipped and counted."""
    node: DepthNode = ros["nodes"]["ramp"]
    h: Harness = ros["harness"]["ramp"]
    wide = Intrinsics(fx=2 * K.fx, fy=2 * K.fy, cx=K.cx, cy=K.cy, width=W, height=H)

    def frame_with_infos(*infos: tuple[Intrinsics, int, str]) -> tuple[int, int]:
        """Publish camera_infos (intrinsics, stamp offset ns, frame_id), then the image."""
        image = rgb_to_image(_frame(6))
        image.header.frame_id = "camera_optical_frame"
        image.header.stamp.sec, image.header.stamp.nanosec = 1000 + next(_stamps), 4242
        for intrinsics, offset, frame_id in infos:
            info = _info(intrinsics)
            info.header.frame_id = frame_id
            info.header.stamp.sec, info.header.stamp.nanosec = divmod(
                stamp_ns(image.header) + offset, 1_000_000_000)
            h.info.publish(info)
        h.image.publish(image)
        return image.header.stamp.sec, image.header.stamp.nanosec

    def camera_info_counts() -> dict[str, int]:
        return node.stats.snapshot()["camera_info"]

    # Its own camera_info, then a newer one with other intrinsics: the frame keeps its own.
    out = h.wait("depth/camera_info", frame_with_infos(
        (K, 0, "camera_optical_frame"), (wide, 10**9, "camera_optical_frame")))
    assert out.k[0] == pytest.approx(K.fx)
    # 3 ms off pairs (tolerance 5 ms); 50 ms off does not, nor does another frame_id.
    h.wait("depth", frame_with_infos((K, 3_000_000, "camera_optical_frame")))
    before = camera_info_counts()
    _expect_skip(node, lambda: frame_with_infos((K, 50_000_000, "camera_optical_frame")),
                 "no camera_info within 0.005 s")
    _expect_skip(node, lambda: frame_with_infos((K, 0, "left_optical_frame")),
                 "'left_optical_frame' is not the image's 'camera_optical_frame'")
    after = camera_info_counts()
    assert (after["unpaired"] - before["unpaired"], after["frame_id"] - before["frame_id"]) == (1, 1)


def test_camera_info_sync_latest_takes_the_newest(ros: Any) -> None:
    """The fallback for drivers whose camera_info stamps are unreliable."""
    node = DepthNode(context=ros["context"], namespace="latest", parameter_overrides=[
        Parameter("model_path", value=str(ros["models"] / "ramp.onnx")),
        Parameter("camera_info_sync", value="latest")])
    ros["executor"].add_node(node)
    h = Harness(ros["context"], ros["executor"], node, ("depth",))
    try:
        wait_until(lambda: all(i.reliability == "reliable" for i in node._inputs),
                   what="/latest inputs to match the reliable publishers")
        h.set_camera_info(_info(K))
        _send_until_back(h, "depth", lambda: h.send(rgb_to_image(_frame(7)),
                                                    info_stamp_offset_ns=-10**9))
        assert node.stats.snapshot()["camera_info"] == {"unpaired": 0, "frame_id": 0,
                                                        "implausible": 0}
    finally:
        ros["executor"].remove_node(h.node)
        ros["executor"].remove_node(node)
        h.node.destroy_node()
        node.destroy_node()


def _fields(msg: PointCloud2) -> list[tuple]:
    return [(f.name, f.offset, f.datatype, f.count) for f in msg.fields]


def _cloud(depth: np.ndarray, K: Intrinsics, decimation: int, rgb: np.ndarray | None
           ) -> PointCloud2:
    """How the node built ``points`` before cloud_resolution: the published depth's grid."""
    points, colors = build_point_cloud(depth, K, decimation, rgb)
    return points_to_pointcloud2(points, None, colors)


@pytest.mark.parametrize("decimation", [1, 3])
def test_cloud_message_camera_is_the_old_cloud_and_model_the_network_grid(
        tmp_path: Path, decimation: int) -> None:
    """``points`` built by cloud_message: at camera resolution byte for byte the cloud the
    node published before (the whole published depth grid); at model resolution (the
    default) the cloud of the network's grid, as a model-resolution run would give it."""
    model = OnnxDepthModel(write_linear_onnx(tmp_path / "ramp.onnx", 4.0, 1.0), providers="cpu")
    config = {"input_size": (H // 2, W // 2), "min_depth": MIN_D, "max_depth": MAX_D}
    rgb = _frame(5)
    result = DepthEstimator(model, EstimatorConfig(**config)).estimate(rgb, K)
    at_model = DepthEstimator(model, EstimatorConfig(output_resolution="model", **config)
                              ).estimate(rgb, K)
    for colour in (rgb, None):
        old = _cloud(result.depth, result.intrinsics, decimation, colour)
        camera = cloud_message(result, colour, "camera", decimation)
        assert bytes(camera.data) == bytes(old.data)
        assert _fields(camera) == _fields(old)
        assert ((camera.height, camera.width, camera.point_step, camera.row_step)
                == (old.height, old.width, old.point_step, old.row_step)
                == (-(-H // decimation), -(-W // decimation), old.point_step,
                    old.point_step * -(-W // decimation)))
        small = cloud_message(result, colour, "model", decimation)
        same = _cloud(at_model.depth, at_model.intrinsics, decimation, colour)
        assert bytes(small.data) == bytes(same.data) and _fields(small) == _fields(same)
        assert (small.height, small.width) == (-(-H // 2 // decimation), -(-W // 2 // decimation))
        assert small.is_dense is False and small.point_step == (16 if colour is not None else 12)
    # Invalid depth (outside [min_depth, max_depth]) is NaN in the cloud, as in the image.
    points, colors = pointcloud2_to_numpy(cloud_message(result, rgb, "model", 1))
    invalid = np.isnan(result.model_depth)
    assert invalid.any() and (~invalid).any()
    assert np.isnan(points[invalid]).all() and np.isfinite(points[~invalid]).all()
    np.testing.assert_allclose(points[..., 2], result.model_depth)
    assert colors.shape == (H // 2, W // 2, 3)


def test_points_at_model_resolution_by_default_through_dds(ros: Any) -> None:
    """A subscriber gets ``points`` on the network's grid unless cloud_resolution is camera."""
    node = DepthNode(context=ros["context"], namespace="grid", parameter_overrides=[
        Parameter("model_path", value=str(ros["models"] / "ramp.onnx")),
        Parameter("min_depth", value=MIN_D), Parameter("max_depth", value=MAX_D),
        Parameter("model_input_height", value=H // 2),
        Parameter("model_input_width", value=W // 2)])
    assert node.get_parameter("cloud_resolution").value == "model"
    ros["executor"].add_node(node)
    h = Harness(ros["context"], ros["executor"], node, ("depth", "depth/camera_info", "points"))
    try:
        wait_until(lambda: node._pubs["points"].get_subscription_count(),
                   what="points subscriber")
        h.set_camera_info(_info(K))
        cloud = _send_until_back(h, "points", lambda: h.send(rgb_to_image(_frame(6))))
        stamp = (cloud.header.stamp.sec, cloud.header.stamp.nanosec)
        depth = h.wait("depth", stamp)
        assert (depth.height, depth.width) == (H, W)  # the depth image stays at camera size
        assert (cloud.height, cloud.width) == (H // 2, W // 2)
        points, _ = pointcloud2_to_numpy(cloud)
        assert np.isfinite(points).any()
        assert node.set_parameters([Parameter("cloud_resolution", value="camera")])[0].successful
        dense = h.wait("points", h.send(rgb_to_image(_frame(6))))
        assert (dense.height, dense.width) == (H, W)
        bad = node.set_parameters([Parameter("cloud_resolution", value="full")])[0]
        assert not bad.successful and "cloud_resolution" in bad.reason
    finally:
        ros["executor"].remove_node(h.node)
        ros["executor"].remove_node(node)
        h.node.destroy_node()
        node.destroy_node()


def test_matching_reliability_is_rosbag2s_rule() -> None:
    assert matching_reliability([]) == "best_effort"  # matches whichever publisher comes
    assert matching_reliability(["reliable", "reliable"]) == "reliable"
    assert matching_reliability(["reliable", "best_effort"]) == "best_effort"


def test_input_reliability_auto_follows_the_publishers(ros: Any) -> None:
    """auto (the default): reliable for reliable publishers (a best-effort reader loses
    fragmented frames from them), best effort as soon as one publisher is, frames flowing."""
    node = DepthNode(context=ros["context"], namespace="auto", parameter_overrides=[
        Parameter("model_path", value=str(ros["models"] / "ramp.onnx")),
        Parameter("model_input_height", value=H), Parameter("model_input_width", value=W)])
    image = node._inputs[0]
    assert node.get_parameter("input_reliability").value == "auto"
    assert image.reliability == "best_effort"  # no publisher yet
    ros["executor"].add_node(node)
    h = Harness(ros["context"], ros["executor"], node, ("depth",))  # reliable publishers
    lossy = rclpy.create_node("lossy_camera", namespace="auto", context=ros["context"])
    try:
        wait_until(lambda: image.reliability == "reliable", what="a reliable image input")
        h.set_camera_info(_info(K))
        _send_until_back(h, "depth", lambda: h.send(rgb_to_image(_frame(1))))
        lossy.create_publisher(Image, "image", QoSProfile(
            depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
        wait_until(lambda: image.reliability == "best_effort", what="a best-effort image input")
        # The reliable publisher still reaches the best-effort input.
        _send_until_back(h, "depth", lambda: h.send(rgb_to_image(_frame(2))))
        lossy.destroy_node()
        wait_until(lambda: image.reliability == "reliable", what="reliable again")
    finally:
        ros["executor"].remove_node(h.node)
        ros["executor"].remove_node(node)
        h.node.destroy_node()
        node.destroy_node()
        if lossy.handle is not None:
            lossy.destroy_node()


def test_hot_swap_under_a_stream(ros: Any) -> None:
    node: DepthNode = ros["nodes"]["fast"]
    h: Harness = ros["harness"]["fast"]
    rgb = _scene_rgb()
    K_cam = Intrinsics(525.0, 525.0, (rgb.shape[1] - 1) / 2, (rgb.shape[0] - 1) / 2,
                       rgb.shape[1], rgb.shape[0])
    h.set_camera_info(_info(K_cam))
    constant = write_linear_onnx(ros["models"] / "const.onnx", 0.0, 2.5, size=(224, 224))
    nan_model = write_linear_onnx(ros["models"] / "nan.onnx", 0.0, float("nan"), size=(224, 224))
    small = write_linear_onnx(ros["models"] / "small.onnx", 0.0, 2.5, size=(16, 16))
    sent: list[tuple[int, int]] = [(0, 0)]
    lock = threading.Lock()
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            with lock:
                sent.append(h.send(rgb_to_image(rgb)))
            time.sleep(0.05)

    def depth_now() -> np.ndarray:
        """Depth of a frame published after this call (so after any swap that returned)."""
        with lock:
            stamp = sent[-1]
        return depth_image_to_numpy(h.wait("depth", stamp, newer=True))

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    try:
        first = depth_now()
        assert first.shape == (224, 224) and np.nanstd(first) > 0.05  # a real scene, not flat
        info = h.wait("depth/camera_info", sent[1], newer=True)
        assert camera_info_to_intrinsics(info) == K_cam.scaled(224, 224)
        assert node.set_parameters([Parameter("model_path", value=str(constant))])[0].successful
        np.testing.assert_allclose(depth_now(), 2.5)
        for bad, reason in ((ros["models"] / "missing.onnx", "does not exist"),
                            (nan_model, "not finite"), (small, "fixed 16x16")):
            result = node.set_parameters([Parameter("model_path", value=str(bad))])[0]
            assert not result.successful and reason in result.reason, result.reason
            np.testing.assert_allclose(depth_now(), 2.5)  # the old model still runs
        assert node.get_parameter("model_path").value == str(constant)
        slow = ros["models"] / "slow.onnx"
        assert node.set_parameters([Parameter("model_path", value=str(slow))])[0].successful
        np.testing.assert_allclose(depth_now(), first, rtol=1e-5)
    finally:
        stop.set()
        streamer.join()


def _settled(stats: dict) -> dict | None:
    """The counters when every received frame is accounted for (none in flight)."""
    accounted = stats["processed"] + stats["dropped"] + stats["skipped"] + stats["unwanted"]
    return stats if stats["received"] == accounted else None


def test_newest_frame_only_drops_and_counts(ros: Any) -> None:
    node: DepthNode = ros["nodes"]["fast"]
    h: Harness = ros["harness"]["fast"]
    rgb = _scene_rgb()
    h.set_camera_info(_info(Intrinsics(525.0, 525.0, 319.5, 239.5, rgb.shape[1], rgb.shape[0])))
    before = wait_until(lambda: _settled(node.stats.snapshot()), what="earlier frames to finish")
    stamps = [h.send(rgb_to_image(rgb)) for _ in range(30)]  # far faster than inference
    last = h.wait("depth", stamps[-1], timeout=15.0)  # the newest frame is never dropped
    assert last.header.stamp.sec == stamps[-1][0]

    def delivered() -> tuple[dict, list] | None:
        after = node.stats.snapshot()
        outputs = [m for m in h.msgs["depth"] if m.header.stamp.sec >= stamps[0][0]]
        done = after["processed"] - before["processed"]
        return (after, outputs) if _settled(after) and len(outputs) == done else None

    # a published map reaches the test's subscriber a moment after the counter moves
    after, outputs = wait_until(delivered, what="every processed frame's depth to arrive")
    received = after["received"] - before["received"]
    processed = after["processed"] - before["processed"]
    dropped = after["dropped"] - before["dropped"]
    # under load a frame can beat its camera_info by more than the pairing wait (0.1 s):
    # it is skipped as unpaired, never queued
    unpaired = after["camera_info"]["unpaired"] - before["camera_info"]["unpaired"]
    assert after["skipped"] - before["skipped"] == unpaired
    assert dropped > 0
    assert processed + dropped + unpaired == received  # nothing is queued: run, dropped or unpaired
    assert len(outputs) == processed < 30
    assert after["published"]["points"] == 0  # nobody subscribed to points: no cloud built


def test_a_frame_in_flight_at_shutdown_ends_quietly(ros: Any) -> None:
    """Ctrl-C shuts the context down before destroy_node stops the worker: a frame taken
    just then met an invalid context (RCLError traceback from the worker thread)."""
    context = Context()
    rclpy.init(context=context, domain_id=DOMAIN_ID)
    node = DepthNode(context=context, namespace="closing", parameter_overrides=[
        Parameter("model_path", value=str(ros["models"] / "ramp.onnx"))])
    try:
        rclpy.shutdown(context=context)
        node._process(rgb_to_image(_frame()), None)  # the worker's step
        totals = node.stats.snapshot()
        assert totals["skipped"] == totals["processed"] == totals["unwanted"] == 0
    finally:
        node.destroy_node()


def test_auto_qos_timer_during_destruction_is_quiet(ros: Any) -> None:
    """The auto-QoS timer can fire while destroy_node runs; its InvalidHandle used to escape
    into the shared executor and stop it spinning every other node."""
    node = DepthNode(context=ros["context"], namespace="destroyed", parameter_overrides=[
        Parameter("model_path", value=str(ros["models"] / "ramp.onnx"))])
    node.destroy_node()
    node._match_inputs()  # the timer's callback, after destruction


def test_startup_validation(ros: Any) -> None:
    ctx = ros["context"]
    ramp = str(ros["models"] / "ramp.onnx")

    def make(**params: Any) -> DepthNode:
        overrides = [Parameter("model_path", value=ramp)] + [
            Parameter(k, value=v) for k, v in params.items()]
        return DepthNode(context=ctx, namespace="bad", parameter_overrides=overrides)

    cases = [({"providers": "gpu"}, ValueError, "providers"),
             ({"input_transport": "theora"}, ValueError, "input_transport"),
             ({"min_depth": 5.0, "max_depth": 2.0}, ValueError, "min_depth"),
             ({"model_input_height": 64}, ValueError, "both be 0"),
             ({"model_path": "/nonexistent/model.onnx"}, FileNotFoundError, "does not exist"),
             ({"cloud_decimation": 0}, InvalidParameterValueException, "cloud_decimation")]
    cases.append(({"model_path": str(ros["models"] / "slow.onnx"), "model_input_height": 256,
                   "model_input_width": 256}, ValueError, "fixed 224x224"))
    for params, error, match in cases:
        with pytest.raises(error, match=match):
            make(**params)
    described = ros["nodes"]["ramp"].describe_parameters(["max_depth", "cloud_decimation",
                                                          "providers"])
    assert described[0].floating_point_range[0].to_value == 1000.0 and described[0].description
    assert described[1].integer_range[0].from_value == 1
    assert described[2].read_only and "tensorrt" in described[2].additional_constraints


def _run_main(args: list[str], domain: int) -> subprocess.Popen:
    env = {**os.environ, "ROS_DOMAIN_ID": str(domain), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "depthkd_ros.depth_node", "--ros-args", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_main_starts_stops_and_fails_clearly(tmp_path: Path) -> None:
    ramp = write_linear_onnx(tmp_path / "ramp.onnx", 4.0, 1.0)
    proc = _run_main(["-p", f"model_path:={ramp}"], DOMAIN_ID + 1)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                              daemon=True)
    reader.start()
    wait_until(lambda: any("CPUExecutionProvider" in line for line in lines), timeout=30,
               what="depth_node to start")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0, "".join(lines)
    bad = _run_main(["-p", f"model_path:={ramp}", "-p", "providers:=gpu"], DOMAIN_ID + 1)
    out, _ = bad.communicate(timeout=30)
    assert bad.returncode != 0 and "parameter providers must be one of" in out


_SPIN_RAISING = """
import sys, rclpy
from rclpy.node import Node
from depthkd_ros.node_params import spin

class Failing(Node):
    def __init__(self):
        super().__init__("failing")
        self.create_timer(0.01, self.tick)

    def tick(self):
        if sys.argv[1] == "after_shutdown":
            rclpy.try_shutdown()  # what rclpy's SIGINT handler does first
        raise RuntimeError("Unable to convert call argument '0' to Python object")

spin(Failing)
"""


@pytest.mark.parametrize("case, code", [("after_shutdown", 0), ("running", 1)])
def test_spin_ends_quietly_only_for_errors_after_shutdown(case: str, code: int) -> None:
    """Ctrl-C landing in rclpy's message conversion surfaces as a RuntimeError (seen under
    ros2 launch): after the shutdown it is the shutdown; before it, a real failure."""
    done = subprocess.run([sys.executable, "-c", _SPIN_RAISING, case], cwd=REPO, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO),
                               "ROS_DOMAIN_ID": str(DOMAIN_ID + 1)},
                          capture_output=True, text=True)
    assert done.returncode == code, done.stderr
    assert ("RuntimeError" in done.stderr) == bool(code), done.stderr
