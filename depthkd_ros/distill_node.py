"""distill_node: on-robot label-free distillation beside the live depth_node.

Camera frames -> KeyframeSelector -> on-disk KeyframeStore; a teacher thread labels
stored keyframes through the KServe v2 TeacherClient; a supervisor thread runs the
policy of ``depthkd_core.online.supervisor`` (a round in a separate process that trains,
exports and gates; deploy; rollback). What is live is the depth node's ``model_path``,
read and set through its parameter services. This node wires parameters, threads and
topics to them. Topics, parameters and files are documented in docs/distill_node.md.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rcl_interfaces.msg import Parameter as ParameterMsg
from rcl_interfaces.msg import ParameterType, ParameterValue, SetParametersResult
from rcl_interfaces.srv import GetParameters, SetParameters
from rclpy.parameter import Parameter
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import String

from depthkd_core.online.keyframes import (
    KeyframeSelector,
    KeyframeStore,
    StoreFullError,
)
from depthkd_core.online.rounds import LockBusyError
from depthkd_core.online.supervisor import (
    SUPERVISOR_COUNTERS,
    Counters,
    PushError,
    Supervisor,
    SupervisorConfig,
)
from depthkd_core.serving.client import TeacherClient, TeacherRequestError
from depthkd_ros.conversions import camera_info_to_intrinsics, decode_rgb
from depthkd_ros.depth_pipeline import resolve_model_path
from depthkd_ros.node_base import NewestFrameWorker, diagnostics
from depthkd_ros.node_params import (
    RELIABILITY,
    WARN_THROTTLE_SEC,
    ParamSpec,
    SetupNode,
    check_choices,
    declare_params,
    qos,
    spin,
)

PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("store_dir", "", "state directory: keyframes/, models/, rounds/, state.json "
              "(required; survives restarts)"),
    ParamSpec("max_frames", 500, "keyframes kept on disk (oldest evicted first)", 2, 1000000),
    ParamSpec("min_free_mb", 100, "refuse to write when the disk has less free space (MiB)",
              0, 1000000),
    ParamSpec("min_interval_s", 1.0, "minimum seconds between keyframes", 0.0, 3600.0),
    ParamSpec("novelty_threshold", 0.08, "minimum thumbnail difference to recent keyframes "
              "(mean absolute difference / 255)", 0.0, 1.0),
    ParamSpec("input_transport", "raw", "subscribe to image (raw) or image/compressed",
              choices=("raw", "compressed")),
    ParamSpec("input_reliability", "best_effort", "QoS reliability of the subscriptions",
              choices=tuple(RELIABILITY)),
    ParamSpec("input_depth", 5, "QoS history depth of the subscriptions", 1, 100),
    ParamSpec("teacher_url", "", "teacher server base URL, e.g. http://ws:8000 (required)"),
    ParamSpec("model_name", "teacher", "teacher model name on the server"),
    ParamSpec("token_file", "", "file holding the bearer token; empty = no token"),
    ParamSpec("teacher_timeout_s", 10.0, "HTTP timeout per teacher request", 0.01, 600.0),
    ParamSpec("teacher_retries", 2, "retries per teacher request (exponential backoff)", 0, 20),
    ParamSpec("breaker_failures", 5, "consecutive failures that open the circuit breaker",
              1, 1000),
    ParamSpec("breaker_cooldown_s", 30.0, "seconds the breaker stays open", 0.0, 3600.0),
    ParamSpec("max_backoff_s", 30.0, "longest pause of the teacher thread after a failure",
              0.01, 3600.0),
    ParamSpec("finetune_config", "", "YAML of FinetuneConfig fields for the round; empty = "
              "defaults"),
    ParamSpec("min_new_keyframes", 20, "teacher-labelled keyframes new since the last round "
              "that start a round", 1, 1000000),
    ParamSpec("gate_margin", 0.02, "AbsRel the candidate must beat the live model by", 0.0, 1.0),
    ParamSpec("refused_lr_decay", 0.5, "each round refused in a row multiplies the next round's "
              "learning rate by this (1 = never lowered)", 0.01, 1.0),
    ParamSpec("min_lr_scale", 0.125, "the lowest fraction of the config's learning rate",
              0.001, 1.0),
    ParamSpec("export_height", 192, "ONNX export height of a deployed model (a student that "
              "fixes its input size, like the packaged one, exports at that size)", 32, 4096),
    ParamSpec("export_width", 256, "ONNX export width of a deployed model (see export_height)",
              32, 4096),
    ParamSpec("round_timeout_s", 3600.0, "a fine-tuning round running longer is killed",
              1.0, 86400.0),
    ParamSpec("depth_node", "depth_node", "name of the depth node to hot-swap (relative names "
              "resolve in this namespace)"),
    ParamSpec("depth_node_param", "model_path", "the depth node's model parameter: what is "
              "live (read at start and before each round, set to deploy and roll back)"),
    ParamSpec("service_timeout_s", 10.0, "wait for the depth node's parameter services", 0.1,
              600.0),
    ParamSpec("retry_pause_s", 5.0, "pause after a failed round or an unreachable depth node",
              0.0, 3600.0),
    ParamSpec("shutdown_timeout_s", 3.0, "at shutdown, the longest wait for each worker thread "
              "(the trainer is killed at once; a teacher request may still be in flight)",
              0.1, 60.0),
    ParamSpec("status_period", 1.0, "seconds between distill/status and /diagnostics", 0.1,
              60.0),
    ParamSpec("rollback", False, "set true: deploy the previous model again (resets to false)",
              dynamic=True),
)


def validate(values: dict[str, Any]) -> None:
    """Start-up checks (ValueError/FileNotFoundError naming the parameter)."""
    check_choices(PARAMS, values)
    for name in ("store_dir", "teacher_url", "model_name", "depth_node", "depth_node_param"):
        if not values[name]:
            raise ValueError(f"parameter {name} must be set")
    if not values["teacher_url"].startswith(("http://", "https://")):
        raise ValueError(f"parameter teacher_url must start with http:// or https://, got "
                         f"{values['teacher_url']!r}")
    for name in ("token_file", "finetune_config"):
        if values[name] and not Path(values[name]).expanduser().is_file():
            raise FileNotFoundError(f"parameter {name}: {values[name]!r} does not exist")


def read_token(path: str) -> str | None:
    """The bearer token in ``path`` (stripped); None for an empty path."""
    if not path:
        return None
    token = Path(path).expanduser().read_text().strip()
    if not token:
        raise ValueError(f"parameter token_file: {path!r} is empty")
    return token


class DistillNode(SetupNode):
    """Collects keyframes, labels them with a remote teacher, refines and hot-swaps."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("distill_node", **kwargs)

    def _setup(self) -> None:
        v = self.values = declare_params(self, PARAMS)
        validate(v)
        root = Path(v["store_dir"]).expanduser()
        self._counters = Counters("received", "skipped", "keyframes", "store_errors", "labelled",
                                  "teacher_failures", "teacher_rejected", *SUPERVISOR_COUNTERS)
        self.counts = self._counters.values  # read-only view for status and tests
        cfg = SupervisorConfig(v["min_new_keyframes"], v["gate_margin"], v["export_height"],
                               v["export_width"], v["round_timeout_s"], v["finetune_config"],
                               v["retry_pause_s"], v["refused_lr_decay"], v["min_lr_scale"])
        try:  # first: its lock keeps a second node off the store before anything is written
            self.supervisor = Supervisor(root, cfg, self._push, self._read_live, self._counters,
                                         self.get_logger())
        except LockBusyError as exc:
            raise RuntimeError(f"parameter store_dir: {root} is in use by another distill_node "
                               f"(pid {exc.pid})") from None
        try:
            self._build(v, root)
        except BaseException:
            self.supervisor.close()
            raise

    def _build(self, v: dict[str, Any], root: Path) -> None:
        self.store = KeyframeStore(root / "keyframes", max_frames=v["max_frames"],
                                   min_free_bytes=v["min_free_mb"] * 2**20)
        self.selector = KeyframeSelector(v["min_interval_s"], v["novelty_threshold"])
        self.client = TeacherClient(v["teacher_url"], v["model_name"], read_token(v["token_file"]),
                                    timeout_s=v["teacher_timeout_s"], retries=v["teacher_retries"],
                                    breaker_failures=v["breaker_failures"],
                                    breaker_cooldown_s=v["breaker_cooldown_s"])
        self.store_error = ""
        self.teacher_ms: float | None = None
        self.deployed = ""
        self._lock = threading.Lock()  # the newest camera_info
        self._store_lock = threading.Lock()  # the writer store is shared by two threads
        self._info: CameraInfo | None = None
        self._stop = threading.Event()
        self._frames: NewestFrameWorker[Image | CompressedImage] = NewestFrameWorker(
            self._collect, "distill_collect")
        self._make_topics(v)
        self._get_client = self.create_client(GetParameters, f"{v['depth_node']}/get_parameters")
        self._push_client = self.create_client(SetParameters,
                                               f"{v['depth_node']}/set_parameters")
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.create_timer(v["status_period"], self._publish_status)
        self._threads = [threading.Thread(target=t, name=f"distill_{t.__name__}", daemon=True)
                         for t in (self._teacher_loop, self._supervise_loop)]
        self._frames.start()
        for thread in self._threads:
            thread.start()

    def _make_topics(self, v: dict[str, Any]) -> None:
        qos_in = qos(v["input_reliability"], v["input_depth"])
        if v["input_transport"] == "raw":
            self.create_subscription(Image, "image", self._on_image, qos_in)
        else:
            self.create_subscription(CompressedImage, "image/compressed", self._on_image, qos_in)
        self.create_subscription(CameraInfo, "camera_info", self._on_info, qos_in)
        self._status = self.create_publisher(String, "distill/status", 10)
        self._diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)

    def _count(self, key: str, error: str = "") -> None:
        self._counters.add(key, error)

    @property
    def last_error(self) -> str:
        return self._counters.last_error

    # -- camera: newest frame only, selection and storage off the executor -----------------
    def _on_image(self, msg: Image | CompressedImage) -> None:
        self._frames.put(msg)
        self._count("received")

    def _on_info(self, msg: CameraInfo) -> None:
        with self._lock:
            self._info = msg

    def _collect(self, msg: Image | CompressedImage) -> None:
        with self._lock:
            info = self._info
        try:
            if info is None:
                raise ValueError("no camera_info received yet")
            rgb = decode_rgb(msg)
            stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
            if not self.selector.accept(rgb, stamp):
                return
            with self._store_lock:
                self.store.add(rgb, camera_info_to_intrinsics(info), stamp)
            self._count("keyframes")
            self.store_error = ""
        except StoreFullError as exc:  # nothing written: the store is intact, keep running
            self.store_error = str(exc)
            self._count("store_errors", f"store full: {exc}")
            self.get_logger().error(f"keyframe dropped, store full: {exc}",
                                    throttle_duration_sec=WARN_THROTTLE_SEC)
        except Exception as exc:  # a bad frame must not kill the thread
            self._count("store_errors" if isinstance(exc, OSError) else "skipped",
                        f"frame skipped: {exc}")
            self.get_logger().warning(f"frame skipped: {exc}",
                                      throttle_duration_sec=WARN_THROTTLE_SEC)

    # -- teacher: label pending keyframes, back off while the teacher is down --------------
    def _teacher_loop(self) -> None:
        failures, refused, kind = 0, set(), None
        while not self._stop.is_set():
            with self._store_lock:
                pending = [k for k in self.store.pending_teacher() if k not in refused]
            if not pending:
                self._stop.wait(0.2)
                continue
            try:
                if kind is None:  # Triton has no such parameters: a metric teacher
                    params = self.client.metadata().get("parameters", {})
                    kind = {"is_inverse": bool(params.get("is_inverse", False)),
                            "is_metric": bool(params.get("is_metric", True))}
                self._label(pending[0], kind)
                failures = 0
            except StoreFullError as exc:  # the answer cannot be kept: the disk, not the teacher
                self.store_error = str(exc)
                self._count("store_errors", f"store full: {exc}")
                self._stop.wait(self.values["max_backoff_s"])
            except TeacherRequestError as exc:  # this frame is refused: never resend it
                refused.add(pending[0])
                self._count("teacher_rejected", str(exc))
            except Exception as exc:  # down, 5xx, garbage, evicted key
                failures += 1
                self._count("teacher_failures", f"teacher: {exc}")
                self.get_logger().warning(f"teacher failed: {exc}",
                                          throttle_duration_sec=WARN_THROTTLE_SEC)
                pause = min(self.values["max_backoff_s"], 0.1 * 2 ** min(failures, 20))
                self._stop.wait(max(pause, self.client.breaker.seconds_left()))

    def _label(self, key: str, kind: dict[str, bool]) -> None:
        with self._store_lock:
            frame = self.store.load(key)
        image = np.ascontiguousarray(frame.rgb.transpose(2, 0, 1)[None], np.float32) / 255.0
        depth = self.client.infer(image)[0, 0]
        self.teacher_ms = self.client.last_latency_ms
        with self._store_lock:
            self.store.set_teacher_depth(key, depth, **kind)
        self._count("labelled")

    # -- supervisor: the policy runs in depthkd_core.online; here its ROS ends -------------
    def _supervise_loop(self) -> None:
        self.supervisor.run(self._stop)

    def _call(self, client: Any, request: Any) -> Any:
        """A service call answered within service_timeout_s (the executor spins elsewhere);
        PushError when it is not. Shutdown ends the wait at once."""
        timeout = self.values["service_timeout_s"]
        deadline = time.monotonic() + timeout
        while not client.service_is_ready():
            if self._stop.wait(0.05) or time.monotonic() > deadline:
                raise PushError(f"no service {client.srv_name} after {timeout:g} s")
        future = client.call_async(request)
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        while not done.wait(0.05):
            if self._stop.is_set() or time.monotonic() > deadline:
                raise PushError(f"{client.srv_name} did not answer within {timeout:g} s")
        if future.result() is None:
            raise PushError(f"{client.srv_name} failed: {future.exception()}")
        return future.result()

    def _read_live(self) -> Path:
        """The model file the depth node runs: its model parameter, resolved as it does."""
        name = self.values["depth_node_param"]
        values = self._call(self._get_client, GetParameters.Request(names=[name])).values
        if not values or values[0].type != ParameterType.PARAMETER_STRING:
            raise ValueError(f"{self._get_client.srv_name}: no string parameter {name!r}")
        return resolve_model_path(values[0].string_value)

    def _push(self, model: Path) -> None:
        """Set the depth node's model parameter; PushError with its reason if refused."""
        value = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=str(model))
        request = SetParameters.Request(parameters=[
            ParameterMsg(name=self.values["depth_node_param"], value=value)])
        result = self._call(self._push_client, request).results[0]
        if not result.successful:
            raise PushError(f"depth node rejected {model}: {result.reason}")
        self.deployed = str(model)

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        for p in params:
            if p.name == "rollback" and p.value:
                threading.Thread(target=self._rollback, daemon=True).start()
        return SetParametersResult(successful=True)

    def _rollback(self) -> None:
        try:
            self.supervisor.rollback()
        except Exception as exc:  # nothing deployed, the depth node refused
            self._count("deploy_rejected", f"rollback failed: {exc}")
            self.get_logger().error(f"rollback failed: {exc}")
        self.set_parameters([Parameter("rollback", value=False)])

    # -- status ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Everything distill/status carries (also the diagnostics values)."""
        with self._store_lock:
            stored, pending = len(self.store.keys()), len(self.store.pending_teacher())
        breaker = self.client.breaker
        counts, last_error = self._counters.snapshot()
        return {"frames_stored": stored, "pending_teacher": pending,
                "teacher_rtt_ms": self.teacher_ms, "teacher_failures": counts["teacher_failures"],
                "breaker": "open" if breaker.is_open else
                           ("half_open" if breaker.opened_at is not None else "closed"),
                **self.supervisor.status(), "store_error": self.store_error,
                "last_error": last_error, **counts}

    def _publish_status(self) -> None:
        status = self.status()
        self._status.publish(String(data=json.dumps(status)))
        level, message = DiagnosticStatus.OK, "collecting"
        if status["breaker"] != "closed" or (status["pending_teacher"] and status["teacher_failures"]):
            level, message = DiagnosticStatus.WARN, "teacher unavailable"
        if status["store_error"]:
            level, message = DiagnosticStatus.ERROR, f"store full: {status['store_error']}"
        self._diagnostics.publish(diagnostics(self, "distill", level, message,
                                              self.values["teacher_url"], status))

    def destroy_node(self) -> None:
        if hasattr(self, "_threads"):
            self._stop.set()  # the supervisor kills a running trainer within 0.1 s
            self._frames.stop(self.values["shutdown_timeout_s"])
            for thread in self._threads:
                thread.join(timeout=self.values["shutdown_timeout_s"])
            self.client.close()
            self.supervisor.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    """``ros2 run depthkd_ros distill_node``."""
    spin(DistillNode, args)


if __name__ == "__main__":
    main()
