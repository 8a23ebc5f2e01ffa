"""depth_node: camera image (+ camera_info) -> metric depth, depth/camera_info, points.

The math lives in ``depthkd_core.inference`` and ``depthkd_ros.conversions``;
this node only wires topics to it (the depth_image_proc split). Only the newest
frame is processed: a callback stores the latest message and one worker thread
runs it, so frames that arrive during inference are dropped and counted, never
queued. Topics, parameters and QoS are documented in docs/depth_node.md.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rcl_interfaces.msg import SetParametersResult
from rclpy.exceptions import InvalidHandle
from rclpy.parameter import Parameter
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2

from depthkd_core.geometry import Intrinsics, IntrinsicsBounds, colorize_depth
from depthkd_core.inference import (
    ALIGNMENTS,
    CLOUD_RESOLUTIONS,
    OUTPUT_RESOLUTIONS,
    SPARSE_ALIGNMENTS,
    DepthEstimator,
    DepthResult,
)
from depthkd_core.stamps import RecentByStamp
from depthkd_ros.conversions import (
    MAX_DECODED_PIXELS,
    camera_info_to_intrinsics,
    decode_rgb,
    depth_image_to_numpy,
    depth_to_image,
    intrinsics_to_camera_info,
    rgb_to_image,
    stamp_ns,
)
from depthkd_ros.depth_pipeline import (
    CameraInfoMismatch,
    FrameStats,
    Pipeline,
    cloud_message,
    estimator_config,
    intrinsics_bounds,
    load_estimator,
    resolve_model_path,
)
from depthkd_ros.node_base import NewestFrameWorker, diagnostics
from depthkd_ros.node_params import (
    AUTO_QOS_PERIOD_SEC,
    INPUT_RELIABILITY,
    RELIABILITY,
    WARN_THROTTLE_SEC,
    InputSubscription,
    ParamSpec,
    SetupNode,
    check_choices,
    declare_params,
    qos,
    spin,
)

# camera_info_sync stamp: a frame's camera_info may arrive just after the frame (two topics);
# the worker waits this long for it before skipping the frame.
CAMERA_INFO_WAIT_SEC = 0.1
PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("model_path", "", "ONNX depth model; empty = the packaged student "
              "(depthkd_ros/models/student.onnx). Setting it at run time hot-swaps the model",
              dynamic=True),
    ParamSpec("providers", "auto", "ONNX Runtime execution provider",
              choices=("auto", "cpu", "cuda", "tensorrt")),
    ParamSpec("model_input_height", 0, "network input height (px); 0 = from the model "
              "(dynamic models: frame height rounded to a multiple of 32)", 0, 4096),
    ParamSpec("model_input_width", 0, "network input width (px); 0 = from the model", 0, 4096),
    ParamSpec("input_transport", "raw", "subscribe to image (raw) or image/compressed",
              choices=("raw", "compressed")),
    ParamSpec("output_resolution", "camera", "publish depth at the camera or the model "
              "resolution", choices=OUTPUT_RESOLUTIONS, dynamic=True),
    ParamSpec("alignment", "none", "none = metric model; scale = multiply by depth_scale; "
              "lsq/median = fit to the sparse_depth topic", choices=ALIGNMENTS),
    ParamSpec("depth_scale", 1.0, "fixed scale for alignment=scale", 1e-6, 1e6, dynamic=True),
    ParamSpec("min_depth", 0.1, "depths below this (m) become NaN", 0.0, 1000.0, dynamic=True),
    ParamSpec("max_depth", 10.0, "depths above this (m) become NaN", 0.0, 1000.0, dynamic=True),
    ParamSpec("cloud_resolution", "model", "points on the network's depth grid (model) or on "
              "the published depth's (camera: as many points as pixels, the extra ones "
              "interpolated; a VGA cloud is 4.9 MB per frame)", choices=CLOUD_RESOLUTIONS,
              dynamic=True),
    ParamSpec("cloud_decimation", 1, "points keeps every N-th row and column", 1, 16,
              dynamic=True),
    ParamSpec("publish_colored", True, "publish depth/colored (bgr8 preview)", dynamic=True),
    ParamSpec("cloud_rgb", True, "add the rgb field to points", dynamic=True),
    ParamSpec("input_reliability", "auto", "QoS reliability of the subscriptions: auto "
              "matches the publishers (reliable when all of them are, else best_effort), "
              "re-checked every second; best_effort accepts either kind of publisher",
              choices=INPUT_RELIABILITY),
    ParamSpec("input_depth", 5, "QoS history depth of the subscriptions", 1, 100),
    ParamSpec("camera_info_sync", "stamp", "pair each image with the camera_info of its stamp "
              "(stamp; the frame is skipped when none is within camera_info_tolerance) or with "
              "the newest one (latest: drivers whose camera_info stamps are unreliable)",
              choices=("stamp", "latest")),
    ParamSpec("camera_info_tolerance", 0.005, "largest stamp difference (s) between an image "
              "and its camera_info for camera_info_sync stamp", 0.0, 1.0),
    ParamSpec("output_reliability", "reliable", "QoS reliability of the outputs (reliable "
              "serves reliable and best-effort subscribers such as RViz)",
              choices=tuple(RELIABILITY)),
    ParamSpec("output_depth", 1, "QoS history depth of the outputs", 1, 100),
    ParamSpec("swap_check_frames", 3, "a new model_path is judged on this many of the last "
              "decoded frames (the bundled demo frame before any arrived): it must give "
              "finite depth on each", 1, 30),
    ParamSpec("diagnostics_period", 1.0, "seconds between /diagnostics messages", 0.1, 60.0),
    ParamSpec("max_decoded_pixels", MAX_DECODED_PIXELS, "largest image (width x height) "
              "decoded, raw or compressed; a PNG/JPEG declaring more is refused from its "
              "header before decoding (decompression bombs). Default 4096x4096", 1, 1 << 30),
    ParamSpec("min_focal_ratio", IntrinsicsBounds.min_focal, "smallest plausible camera_info "
              "focal length in image sizes (fx / width, fy / height; 0.1 = 157 deg field of "
              "view); a frame whose camera_info is below it is skipped", 1e-3, 10.0),
    ParamSpec("max_focal_ratio", IntrinsicsBounds.max_focal, "largest plausible focal length "
              "in image sizes (100 = 0.6 deg field of view)", 1.0, 1e4),
    ParamSpec("max_principal_offset", IntrinsicsBounds.principal_margin, "farthest plausible "
              "principal point from the image centre, in image sizes (1 = half an image "
              "outside the image)", 0.0, 100.0),
)


class DepthNode(SetupNode):
    """Monocular depth from a camera stream with a distilled ONNX student."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("depth_node", **kwargs)

    def _setup(self) -> None:
        values = declare_params(self, PARAMS)
        self._bounds = intrinsics_bounds(values)  # before the slow model load
        self._pipeline = self._make_pipeline(values, load_estimator(values, []))
        self.get_logger().info(f"model {self._pipeline.model_path} on "
                               f"{self._pipeline.estimator.model.provider}")
        self.stats = FrameStats()
        self._lock = threading.Lock()
        # The last decoded frames (references, not copies): what a hot-swap is judged on.
        self._recent: deque[np.ndarray] = deque(maxlen=values["swap_check_frames"])
        self._infos: RecentByStamp[CameraInfo] = RecentByStamp()
        self._info_arrived = threading.Condition(self._lock)
        self._info_sync = values["camera_info_sync"]
        self._info_tolerance_ns = int(values["camera_info_tolerance"] * 1e9)
        self._max_pixels = values["max_decoded_pixels"]
        self._sparse: Image | None = None
        self._stop = threading.Event()  # set while the node is destroyed
        self._frames: NewestFrameWorker[Image | CompressedImage] = NewestFrameWorker(
            self._process_newest, "depth_node_worker")
        self._make_topics(values)
        self._candidate: tuple[Pipeline, bool] | None = None
        self.add_on_set_parameters_callback(self._on_set_parameters)
        # Humble has no post-set hook: there a validated change is committed at once.
        self._commit_on_set = not hasattr(self, "add_post_set_parameters_callback")
        if not self._commit_on_set:
            self.add_post_set_parameters_callback(self._on_parameters_set)
        self.create_timer(values["diagnostics_period"], self._publish_diagnostics)
        self._frames.start()

    def parameter_values(self) -> dict[str, Any]:
        """Current value of every declared parameter, by name."""
        return {spec.name: self.get_parameter(spec.name).value for spec in PARAMS}

    @staticmethod
    def _make_pipeline(values: dict[str, Any], estimator: DepthEstimator) -> Pipeline:
        return Pipeline(estimator, values["cloud_resolution"], values["cloud_decimation"],
                        values["publish_colored"], values["cloud_rgb"],
                        str(resolve_model_path(values["model_path"])))

    def _make_topics(self, values: dict[str, Any]) -> None:
        def subscribe(kind: type, topic: str, callback: Any) -> InputSubscription:
            return InputSubscription(self, kind, topic, callback, values["input_reliability"],
                                     values["input_depth"])

        qos_out = qos(values["output_reliability"], values["output_depth"])
        self._inputs = [subscribe(Image, "image", self._on_image)
                        if values["input_transport"] == "raw" else
                        subscribe(CompressedImage, "image/compressed", self._on_image),
                        subscribe(CameraInfo, "camera_info", self._on_camera_info)]
        if values["alignment"] in SPARSE_ALIGNMENTS:
            self._inputs.append(subscribe(Image, "sparse_depth", self._on_sparse))
        if values["input_reliability"] == "auto":
            self.create_timer(AUTO_QOS_PERIOD_SEC, self._match_inputs)
        self._pubs = {"depth": self.create_publisher(Image, "depth", qos_out),
                      "camera_info": self.create_publisher(CameraInfo, "depth/camera_info",
                                                           qos_out),
                      "colored": self.create_publisher(Image, "depth/colored", qos_out),
                      "points": self.create_publisher(PointCloud2, "points", qos_out)}
        self._diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)

    def _match_inputs(self) -> None:
        # The timer can fire while the node is being destroyed; an exception here would end
        # the executor's spin for every node it serves.
        if self._stop.is_set():
            return
        try:
            for subscription in self._inputs:
                subscription.match()
        except InvalidHandle:
            if not self._stop.is_set():
                raise

    # -- callbacks: store the newest message only ------------------------------------------
    def _on_image(self, msg: Image | CompressedImage) -> None:
        replaced = self._frames.put(msg)
        self.stats.add("received")
        if replaced:
            self.stats.add("dropped")

    def _on_camera_info(self, msg: CameraInfo) -> None:
        with self._lock:
            self._infos.add(stamp_ns(msg.header), msg)
            self._info_arrived.notify_all()

    def _on_sparse(self, msg: Image) -> None:
        with self._lock:
            self._sparse = msg

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Validate a run-time change: the pipeline it needs is built (a new model_path loaded
        and judged beside the running model) and held until ``_on_parameters_set`` commits it.

        The load happens here, not later, so that a model that cannot run is refused with its
        reason to whoever set the parameter; inference goes on meanwhile on the worker."""
        self._candidate = None
        values = {**self.parameter_values(), **{p.name: p.value for p in params}}
        swap = values["model_path"] != self.get_parameter("model_path").value
        try:
            check_choices(PARAMS, values)
            with self._lock:
                recent = list(self._recent)
            estimator = (load_estimator(values, recent) if swap else
                         DepthEstimator(self._pipeline.estimator.model, estimator_config(values)))
            pipeline = self._make_pipeline(values, estimator)
        # Any failure (missing file, bad protobuf, wrong size, NaN on the recent frames) must keep
        # the old model running, and onnxruntime raises plain Exception subclasses.
        except Exception as exc:
            self.get_logger().warning(f"rejected parameter change: {exc}")
            return SetParametersResult(successful=False, reason=str(exc))
        self._candidate = (pipeline, swap)
        if self._commit_on_set:
            self._on_parameters_set(params)
        return SetParametersResult(successful=True)

    def _on_parameters_set(self, params: list[Parameter]) -> None:
        """Commit what ``_on_set_parameters`` validated, once every validator has accepted."""
        if self._candidate is None:
            return
        pipeline, swap = self._candidate
        self._candidate = None
        self._pipeline = pipeline  # one reference assignment: the swap is atomic
        if swap:
            self.get_logger().info(f"hot-swapped the model: now {pipeline.model_path}")

    # -- worker ------------------------------------------------------------------------------
    def _process_newest(self, msg: Image | CompressedImage) -> None:
        with self._lock:
            sparse = self._sparse
        self._process(msg, sparse)

    def _paired_info(self, msg: Image | CompressedImage) -> CameraInfo:
        """This frame's camera_info (``camera_info_sync``); ValueError skips the frame."""
        with self._lock:
            if self._info_sync == "latest":
                info = self._infos.latest()
            else:
                stamp = stamp_ns(msg.header)
                info = self._infos.nearest(stamp, self._info_tolerance_ns)
                if info is None:
                    self._info_arrived.wait_for(
                        lambda: self._infos.nearest(stamp, self._info_tolerance_ns) is not None,
                        timeout=CAMERA_INFO_WAIT_SEC)
                    info = self._infos.nearest(stamp, self._info_tolerance_ns)
            none_yet = self._infos.latest() is None
        if info is None:
            raise CameraInfoMismatch("unpaired", "no camera_info received yet" if none_yet else
                                     f"no camera_info within {self._info_tolerance_ns / 1e9:g} s "
                                     "of the image stamp (camera_info_sync latest pairs with the "
                                     "newest one)")
        if info.header.frame_id and msg.header.frame_id and (
                info.header.frame_id != msg.header.frame_id):
            raise CameraInfoMismatch("frame_id", f"camera_info frame_id {info.header.frame_id!r} "
                                     f"is not the image's {msg.header.frame_id!r}")
        return info

    def _intrinsics(self, info: CameraInfo) -> Intrinsics:
        """The camera_info's intrinsics if plausible; else the frame is skipped, as without
        a camera_info: a cloud from absurd intrinsics would put points anywhere."""
        try:
            K = camera_info_to_intrinsics(info)
            self._bounds.check(K)
        except ValueError as exc:
            raise CameraInfoMismatch("implausible", f"camera_info refused: {exc}") from None
        return K

    def _wanted(self, pipeline: Pipeline) -> list[str]:
        wanted = [name for name, pub in self._pubs.items() if pub.get_subscription_count() > 0]
        return [n for n in wanted if n != "colored" or pipeline.colored]

    def _process(self, msg: Image | CompressedImage, sparse: Image | None) -> None:
        start = time.perf_counter()
        pipeline = self._pipeline  # read once: a hot-swap applies from the next frame
        try:
            wanted = self._wanted(pipeline)
            if not wanted:
                self.stats.add("unwanted")  # nobody listens: skip inference entirely
                return
            info = self._paired_info(msg)
            rgb = decode_rgb(msg, self._max_pixels)
            with self._lock:
                self._recent.append(rgb)
            sparse_m = (depth_image_to_numpy(sparse, self._max_pixels) if sparse is not None
                        else None)
            result = pipeline.estimator.estimate(rgb, self._intrinsics(info), sparse_m)
            self._publish(msg, rgb, result, pipeline, wanted)
        # A bad frame (or a failing provider) must never kill the worker thread.
        except Exception as exc:
            if not self.context.ok():
                return  # Ctrl-C shut the context down mid-frame: every rcl call fails now
            self.stats.add("skipped", str(exc),
                           exc.kind if isinstance(exc, CameraInfoMismatch) else "")
            self.get_logger().warning(f"skipped frame: {exc}",
                                      throttle_duration_sec=WARN_THROTTLE_SEC)
            return
        self.stats.frame_done(result.timings["inference"],
                              (time.perf_counter() - start) * 1e3, wanted)

    def _publish(self, msg: Image | CompressedImage, rgb: np.ndarray, result: DepthResult,
                 pipeline: Pipeline, wanted: list[str]) -> None:
        header = msg.header
        config = pipeline.estimator.config
        if "depth" in wanted:
            self._pubs["depth"].publish(depth_to_image(result.depth, header))
        if "camera_info" in wanted:
            self._pubs["camera_info"].publish(intrinsics_to_camera_info(result.intrinsics, header))
        if "colored" in wanted:
            preview = colorize_depth(result.depth, config.min_depth, config.max_depth)
            self._pubs["colored"].publish(rgb_to_image(preview, "bgr8", header))
        if "points" in wanted:
            cloud = cloud_message(result, rgb if pipeline.cloud_rgb else None,
                                  pipeline.cloud_resolution, pipeline.decimation, header)
            self._pubs["points"].publish(cloud)

    def _publish_diagnostics(self) -> None:
        window, elapsed = self.stats.take_window()
        totals = self.stats.snapshot()
        frames = window["frames"]
        pipeline = self._pipeline
        values = {
            "rate_hz": frames / max(elapsed, 1e-9),
            "inference_ms": window["inference_ms"] / max(frames, 1),
            "total_ms": window["total_ms"] / max(frames, 1),
            "dropped_frames": totals["dropped"], "skipped_frames": totals["skipped"],
            "processed_frames": totals["processed"], "received_frames": totals["received"],
            "unwanted_frames": totals["unwanted"], "input_reliability": self._inputs[0].reliability,
            "camera_info_unpaired": totals["camera_info"]["unpaired"],
            "camera_info_frame_id_mismatch": totals["camera_info"]["frame_id"],
            "camera_info_implausible": totals["camera_info"]["implausible"],
            "provider": pipeline.estimator.model.provider, "model_path": pipeline.model_path,
            "last_error": totals["last_error"],
        }
        self._diagnostics.publish(diagnostics(
            self, "depth estimation", DiagnosticStatus.OK if frames else DiagnosticStatus.WARN,
            "running" if frames else "no frames processed in this period", values["provider"], values))

    def destroy_node(self) -> None:
        if hasattr(self, "_frames"):
            self._stop.set()
            self._frames.stop(timeout=5.0)
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    """``ros2 run depthkd_ros depth_node``."""
    spin(DepthNode, args)


if __name__ == "__main__":
    main()
