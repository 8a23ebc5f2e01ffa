"""`depthkd fuzz-node`: a real depth_node process fed a seeded mix of hostile messages.

One phase per input transport (raw ``image``, then ``image/compressed``), each with
its own depth_node process started as ``ros2 run`` starts it (``harness.NodeProcess``):
first a clean run that sends only the phase's valid frames, then the fuzz run that
sends the same valid frames interleaved with malformed ones (unknown or wrong-kind
encodings, truncated or oversized data, absurd declared sizes, decompression bombs,
corrupt and foreign compressed formats, absurd or unpaired camera_info, hot-swap
requests to a model that is NaN on real content). Messages go one at a time, and each
is waited for until the node's own counters (``/diagnostics``) account for it, so none
is dropped unexamined.

Reports crashes (node process exits; the node is restarted and the run goes on), the
fuzzed node's peak RSS against the clean run's, and drift: each valid frame's depth
must be bit-identical every time it is sent during the fuzz run, and identical to the
clean run's. A command, not a test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from depthkd_ros.depth_pipeline import PACKAGED_MODEL
from depthkd_ros.tools.harness import NodeProcess, default_domain_id
from depthkd_ros.tools.fuzz_messages import (TRANSPORTS, Message, MessageMix, demo_frames,
                                             write_bright_nan_onnx)

NODE_NAME = "depth_node"
DIAGNOSTICS_PERIOD = 0.1  # s: the node's counters are how each message is waited for


# -- the client side ------------------------------------------------------------------------
class FuzzClient(Node):
    """Publishes image + camera_info, hashes each depth output, reads the node's counters."""

    def __init__(self, context: Context, transport: str) -> None:
        super().__init__("depthkd_fuzz_client", context=context)
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5,
                         reliability=ReliabilityPolicy.RELIABLE)
        kind = Image if transport == "raw" else CompressedImage
        self.image_pub = self.create_publisher(kind, "image" if transport == "raw"
                                               else "image/compressed", qos)
        self.info_pub = self.create_publisher(CameraInfo, "camera_info", qos)
        self.cond = threading.Condition()
        self.digests: dict[int, str] = {}  # output stamp (ns) -> sha256 of the depth bytes
        self.counters: dict[str, str] = {}
        self.create_subscription(Image, "depth", self._on_depth, qos)
        self.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        self.params = AsyncParameterClient(self, NODE_NAME)
        self._stamp = 0

    def _on_depth(self, msg: Image) -> None:
        digest = hashlib.sha256(memoryview(msg.data)).hexdigest()
        with self.cond:
            self.digests[msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec] = digest
            self.cond.notify_all()

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.endswith(": depth estimation"):
                with self.cond:
                    self.counters = {kv.key: kv.value for kv in status.values}
                    self.cond.notify_all()

    def send(self, message: Message) -> int:
        """Publish the camera_info then the image, stamped with a fresh stamp; returns it."""
        self._stamp += 1
        stamp = (1_000_000 + self._stamp) * 1_000_000_000
        image = message.image
        image.header.frame_id = "camera_optical_frame"
        image.header.stamp.sec, image.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
        info = message.info
        info.header.frame_id = message.info_frame_id or image.header.frame_id
        info.header.stamp.sec, info.header.stamp.nanosec = divmod(
            stamp + message.info_offset_ns, 1_000_000_000)
        self.info_pub.publish(info)
        self.image_pub.publish(image)
        return stamp

    def totals(self) -> dict[str, int]:
        with self.cond:
            c = self.counters
            return {k: int(c.get(f"{k}_frames", -1)) for k in
                    ("received", "processed", "dropped", "skipped", "unwanted")}

    def _settled(self, received: int) -> dict[str, int] | None:
        t = self.totals()
        done = t["processed"] + t["dropped"] + t["skipped"] + t["unwanted"]
        return t if t["received"] >= received and done == t["received"] else None

    def wait_accounted(self, received: int, timeout: float,
                       stamp: int | None = None) -> dict[str, int] | str | None:
        """The node's counters once it has received ``received`` frames and settled each,
        or sooner the depth digest of the frame ``stamp`` (it was processed); None on timeout.
        """
        def done() -> dict[str, int] | str | None:
            if stamp is not None and stamp in self.digests:
                return self.digests.pop(stamp)
            return self._settled(received)

        with self.cond:
            return self.cond.wait_for(done, timeout)

    def wait_depth(self, stamp: int, timeout: float) -> str | None:
        with self.cond:
            if not self.cond.wait_for(lambda: stamp in self.digests, timeout):
                return None
            return self.digests.pop(stamp)


@dataclass
class PhaseResult:
    """What one node process run (clean or fuzz) saw."""

    sent: int = 0
    crashes: list[dict[str, Any]] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)  # content -> first depth digest
    drifted: list[dict[str, Any]] = field(default_factory=list)
    valid_outputs: int = 0
    valid_skipped: list[str] = field(default_factory=list)
    unaccounted: list[str] = field(default_factory=list)
    by_kind: dict[str, Counter] = field(default_factory=dict)
    swaps: Counter = field(default_factory=Counter)
    final_counters: dict[str, str] = field(default_factory=dict)
    tracebacks: int = 0
    seconds: float = 0.0


class Phase:
    """A depth_node process and the client that feeds it, restarted after a crash."""

    def __init__(self, params: dict[str, Any], transport: str, domain_id: int,
                 log_dir: Path, name: str) -> None:
        self.params, self.domain_id, self.log_dir, self.name = params, domain_id, log_dir, name
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.client = FuzzClient(self.context, transport)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.client)
        self._spinner = threading.Thread(target=self.executor.spin, daemon=True)
        self._spinner.start()
        self.result = PhaseResult()
        self.logs: list[Path] = []
        self.node: NodeProcess | None = None
        # What the node process has received and processed so far, by its own counters.
        self.received = self.processed = 0

    def start_node(self, warmup: Message) -> None:
        log = self.log_dir / f"fuzz_node.{self.name}.{len(self.logs)}.log"
        self.logs.append(log)
        self.node = NodeProcess(self.params, self.domain_id, log)
        deadline = time.monotonic() + 60.0
        while not (self.client.image_pub.get_subscription_count()
                   and self.client.count_publishers("depth") and self.client.counters):
            self.node.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"depth_node did not connect within 60 s; log: {log}")
            time.sleep(0.1)
        with self.client.cond:
            self.client.counters = {}
        # The first frames can precede discovery on the node's side: send one until it is
        # answered, then count from the node's own totals.
        while True:
            self.node.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"depth_node answered no frame within 60 s; log: {log}")
            if self.client.wait_depth(self.client.send(warmup), 2.0) is not None:
                break
        totals = self.client.wait_accounted(1, 10.0)
        if totals is None:
            raise TimeoutError(f"depth_node counters did not settle; log: {log}")
        self.received, self.processed = totals["received"], totals["processed"]

    def step(self, index: int, message: Message, warmup: Message) -> None:
        """Send one message and wait until the node has dealt with it."""
        result = self.result
        outcome = result.by_kind.setdefault(message.kind, Counter())
        outcome["sent"] += 1
        result.sent += 1
        if message.swap_to:
            self._swap(message.swap_to)
        else:
            stamp = self.client.send(message)
            # A valid frame is answered by its depth; any other by the node's counters.
            done = self.client.wait_accounted(self.received + 1, 10.0,
                                              stamp if message.content else None)
            if done is None and self._crashed(index, message, warmup):
                return
            if isinstance(done, str):
                self.received += 1
                self.processed += 1
                outcome["processed"] += 1
                self._check_output(index, message, done)
            else:
                if done is None:
                    result.unaccounted.append(f"{index}:{message.kind}")
                totals = done or self.client.totals()
                self.received = max(self.received, totals["received"])
                processed = totals["processed"] > self.processed
                self.processed = max(self.processed, totals["processed"])
                outcome["processed" if processed else "skipped"] += 1
                if message.content:
                    digest = self.client.wait_depth(stamp, 10.0) if processed else None
                    self._check_output(index, message, digest)
        if index % 25 == 0:
            self.node.sample_memory()
            self._crashed(index, message, warmup)

    def _check_output(self, index: int, message: Message, digest: str | None) -> None:
        result = self.result
        if digest is None:
            result.valid_skipped.append(f"{index}:{message.kind}: "
                                        f"{self.client.counters.get('last_error', '')}")
            return
        result.valid_outputs += 1
        first = result.outputs.setdefault(message.content, digest)
        if digest != first:
            result.drifted.append({"index": index, "kind": message.kind,
                                   "content": message.content})

    def _swap(self, target: str) -> None:
        if not self.client.params.wait_for_services(timeout_sec=10.0):
            self.result.swaps["timeout"] += 1
            return
        future = self.client.params.set_parameters([Parameter("model_path", value=target)])
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        if not done.wait(30.0):
            self.result.swaps["timeout"] += 1
            return
        outcome = future.result().results[0]
        if outcome.successful:  # a model NaN on real content went live: put the real one back
            self.result.swaps["accepted"] += 1
            self.client.params.set_parameters([Parameter("model_path",
                                                         value=self.params["model_path"])])
        else:
            self.result.swaps["refused"] += 1

    def _crashed(self, index: int, message: Message, warmup: Message) -> bool:
        if self.node.process.poll() is None:
            return False
        self.node.stop()
        self.result.peak_rss_mb = max(self.result.peak_rss_mb, self.node.peak_rss_mb)
        self.result.crashes.append({"index": index, "kind": message.kind,
                                    "exit_code": self.node.process.returncode,
                                    "log": str(self.logs[-1])})
        self.start_node(warmup)
        return True

    def close(self) -> PhaseResult:
        if self.node is not None:
            self.result.final_counters = dict(self.client.counters)
            self.node.stop()
            self.result.peak_rss_mb = max(self.result.peak_rss_mb, self.node.peak_rss_mb)
        self.executor.shutdown(timeout_sec=1.0)
        self.client.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._spinner.join(timeout=2.0)
        self.result.tracebacks = sum(log.read_text(errors="replace").count("Traceback")
                                     for log in self.logs if log.is_file())
        return self.result


def run_phase(mix: MessageMix, messages: int, params: dict[str, Any], domain_id: int,
              log_dir: Path, clean: bool) -> PhaseResult:
    """Feed one node process ``messages`` messages of ``mix`` (only the valid ones if
    ``clean``); every valid frame's depth checked against the first of its content."""
    name = f"{mix.transport}.{'clean' if clean else 'fuzz'}"
    start = time.monotonic()
    phase = Phase(params, mix.transport, domain_id, log_dir, name)
    try:
        warmup = mix.warmup()
        phase.start_node(warmup)
        for index in range(messages):
            if clean and not mix.kind(index).startswith("valid_"):
                continue
            phase.step(index, mix.build(index), warmup)
    finally:
        result = phase.close()
    result.seconds = time.monotonic() - start
    return result


def run_fuzz(messages: int, seed: int = 0, model: Path = PACKAGED_MODEL,
             domain_id: int | None = None, log_dir: Path | None = None,
             transports: tuple[str, ...] = TRANSPORTS,
             report: Callable[[str], None] = print) -> dict[str, Any]:
    """Clean and fuzz runs for each transport (``messages`` split between them)."""
    domain_id = default_domain_id() if domain_id is None else domain_id
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="depthkd_fuzz_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    bad_model = write_bright_nan_onnx(log_dir / "bright_nan.onnx")
    frames, K = demo_frames()
    figures: dict[str, Any] = {"messages": messages, "seed": seed, "model": str(model),
                               "logs": str(log_dir), "phases": {}}
    for number, transport in enumerate(transports):
        count = messages // len(transports) + (number < messages % len(transports))
        mix = MessageMix(seed + number, transport, frames, K, bad_model)
        # Reliable inputs from the start: under `auto` the first camera_infos can be lost
        # while the subscriptions switch to match this reliable publisher.
        params = {"model_path": str(Path(model).resolve()), "input_transport": transport,
                  "input_reliability": "reliable", "diagnostics_period": DIAGNOSTICS_PERIOD,
                  "publish_colored": False}
        clean = run_phase(mix, count, params, domain_id, log_dir, clean=True)
        fuzz = run_phase(mix, count, params, domain_id, log_dir, clean=False)
        vs_clean = sorted(c for c, d in fuzz.outputs.items() if clean.outputs.get(c, d) != d)
        phase = {
            "messages": fuzz.sent, "crashes": fuzz.crashes, "tracebacks_in_log": fuzz.tracebacks,
            "peak_rss_mb": round(fuzz.peak_rss_mb, 1),
            "clean_peak_rss_mb": round(clean.peak_rss_mb, 1),
            "clean_valid_frames": clean.sent,
            "rss_over_clean_mb": round(fuzz.peak_rss_mb - clean.peak_rss_mb, 1),
            "valid_outputs": fuzz.valid_outputs, "contents": len(fuzz.outputs),
            "drifted_within_run": fuzz.drifted, "drifted_vs_clean": vs_clean,
            "valid_skipped": fuzz.valid_skipped[:20],
            "valid_skipped_count": len(fuzz.valid_skipped),
            "clean_valid_skipped_count": len(clean.valid_skipped),
            "unaccounted": fuzz.unaccounted, "swaps": dict(fuzz.swaps),
            "by_kind": {k: dict(v) for k, v in sorted(fuzz.by_kind.items())},
            "node_counters": fuzz.final_counters,
            "seconds": round(fuzz.seconds + clean.seconds, 1),
        }
        figures["phases"][transport] = phase
        report(f"  {transport}: {phase['messages']} messages in {phase['seconds']:.0f} s, "
               f"{len(fuzz.crashes)} crashes, peak RSS {phase['peak_rss_mb']} MB vs "
               f"{phase['clean_peak_rss_mb']} MB clean ({phase['rss_over_clean_mb']:+.1f} MB), "
               f"{fuzz.valid_outputs} valid outputs of {len(fuzz.outputs)} contents: "
               f"{len(fuzz.drifted)} drifted, {len(vs_clean)} differ from the clean run, "
               f"{len(fuzz.valid_skipped)} valid frames skipped; "
               f"hot-swaps to bad models refused {fuzz.swaps['refused']}, accepted "
               f"{fuzz.swaps['accepted']}")
    phases = figures["phases"].values()
    figures["crashes"] = sum(len(p["crashes"]) for p in phases)
    figures["max_rss_over_clean_mb"] = max(p["rss_over_clean_mb"] for p in phases)
    figures["drifted"] = sum(len(p["drifted_within_run"]) + len(p["drifted_vs_clean"])
                             for p in phases)
    figures["bad_swaps_accepted"] = sum(p["swaps"].get("accepted", 0) for p in phases)
    return figures


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=10000,
                        help="messages in all, split between the raw and compressed phases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=str(PACKAGED_MODEL), help="ONNX model the node runs")
    parser.add_argument("--transports", default=",".join(TRANSPORTS),
                        help="comma list of input transports to fuzz")
    parser.add_argument("--json", default="fuzz_node.json", help="write the figures here")
    parser.add_argument("--log-dir", default=None, help="node logs (default: a temp folder)")
    parser.add_argument("--domain-id", type=int, default=None)


def run_cli(args: argparse.Namespace) -> int:
    model = Path(args.model)
    if not model.is_file():
        raise FileNotFoundError(f"model not found: {model}")
    transports = tuple(t.strip() for t in args.transports.split(",") if t.strip())
    unknown = set(transports) - set(TRANSPORTS)
    if unknown or not transports:
        raise ValueError(f"--transports must name some of {', '.join(TRANSPORTS)}")
    print(f"depthkd fuzz-node: {args.messages} messages, seed {args.seed}, {model.name}")
    figures = run_fuzz(args.messages, args.seed, model, args.domain_id,
                       Path(args.log_dir) if args.log_dir else None, transports)
    print(f"  total: {figures['crashes']} crashes, peak RSS at most "
          f"{figures['max_rss_over_clean_mb']:+.1f} MB over the clean run, "
          f"{figures['drifted']} drifted valid outputs, "
          f"{figures['bad_swaps_accepted']} bad hot-swaps accepted; logs in {figures['logs']}")
    Path(args.json).write_text(json.dumps(figures, indent=2))
    print(f"  wrote {args.json}")
    ok = (figures["crashes"] == 0 and figures["drifted"] == 0
          and figures["bad_swaps_accepted"] == 0)
    return 0 if ok else 1
