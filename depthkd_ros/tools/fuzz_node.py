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
import struct
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from depthkd_core.data.readers import SimFolder
from depthkd_core.geometry import Intrinsics
from depthkd_ros.conversions import (intrinsics_to_camera_info, numpy_to_image,
                                     rgb_to_compressed, rgb_to_image)
from depthkd_ros.demo import PACKAGED_SEQUENCE
from depthkd_ros.depth_node import PACKAGED_MODEL
from depthkd_ros.harness import NodeProcess, default_domain_id

TRANSPORTS = ("raw", "compressed")
BOMB_SIZE = 16000  # a 746 KB PNG that decodes to 768 MB
FRAME_IDS = (0, 8, 16, 24)  # the demo frames the valid messages show
NODE_NAME = "depth_node"
DIAGNOSTICS_PERIOD = 0.1  # s: the node's counters are how each message is waited for


# -- hostile payloads ---------------------------------------------------------------------
def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload)))


def _deflate_segment(data: bytes) -> bytes:
    """Raw deflate of ``data`` from a fresh state, ending byte-aligned with no reference
    back (full flush): copies of it can follow each other in one stream."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)


def png_bomb(width: int, height: int) -> bytes:
    """A valid all-black RGB PNG of ``width`` x ``height``, compressed about 1000:1
    (16000 x 16000: 768 MB decoded from 746 KB). One block of rows is deflated once and
    repeated, so making it neither holds the decoded image nor deflates 768 MB."""
    row = bytes(1 + 3 * width)  # filter byte 0 + black pixels
    rows_per_block = max(1, min(height, (1 << 22) // len(row)))
    blocks, rest = divmod(height, rows_per_block)
    block = row * rows_per_block
    checksum = 1
    for _ in range(blocks):
        checksum = zlib.adler32(block, checksum)
    checksum = zlib.adler32(row * rest, checksum)
    stream = (b"\x78\xda" + _deflate_segment(block) * blocks
              + (_deflate_segment(row * rest) if rest else b"")
              + b"\x03\x00"  # final empty block
              + struct.pack(">I", checksum))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", stream) + _png_chunk(b"IEND", b""))


def write_bright_nan_onnx(path: Path, threshold: float = 0.5, channel: int = 0) -> Path:
    """A real ONNX depth model finite on black frames, NaN on bright ones:
    depth = 1 - log(threshold - image[:, channel]), NaN wherever that channel > threshold."""
    import onnx
    from onnx import TensorProto, helper

    weight = np.zeros((1, 3, 1, 1), dtype=np.float32)
    weight[0, channel] = -1.0
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["margin"]),  # threshold - channel
         helper.make_node("Log", ["margin"], ["log"]),
         helper.make_node("Sub", ["one", "log"], ["depth"])], "bright_nan_depth",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "H", "W"])],
        [helper.make_tensor_value_info("depth", TensorProto.FLOAT, [1, 1, "H", "W"])],
        [helper.make_tensor("w", TensorProto.FLOAT, weight.shape, weight.ravel().tolist()),
         helper.make_tensor("b", TensorProto.FLOAT, [1], [threshold]),
         helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _resized_jpeg(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with its frame header (SOF0) declaring another size; the scan unchanged."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[:sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9:]


@dataclass
class Message:
    """One fuzz step: an image with the camera_info sent before it, or a hot-swap request.

    ``content`` names a valid frame's pixels: the same content must give the same depth.
    """

    kind: str
    image: Image | CompressedImage | None = None
    info: CameraInfo | None = None
    info_offset_ns: int = 0  # camera_info stamp minus image stamp
    info_frame_id: str = ""  # empty: the image's
    content: str = ""
    swap_to: str = ""


def _absurd_info(K: Intrinsics, rng: np.random.Generator) -> CameraInfo:
    info = intrinsics_to_camera_info(K)
    k = np.asarray(info.k, dtype=np.float64).reshape(3, 3)
    choice = int(rng.integers(9))
    if choice == 0:
        k[0, 0] = k[1, 1] = 1e-30
    elif choice == 1:
        k[0, 2], k[1, 2] = 1e38, -1e38
    elif choice == 2:
        k[0, 0] = float(rng.choice([np.nan, np.inf, -np.inf]))
    elif choice == 3:
        k[0, 0], k[1, 1] = -K.fx, -K.fy
    elif choice == 4:
        k[:] = 0.0
    elif choice == 5:
        k[0, 0] = k[1, 1] = 1e30
    elif choice == 6:
        info.width, info.height = int(rng.integers(0, 1 << 31)), int(rng.integers(0, 1 << 31))
    elif choice == 7:
        k[1, 2] = float(rng.uniform(-1e6, 1e6))
    if choice == 8:  # a sane K but an absurd P, which wins
        info.p = [float(v) for v in rng.uniform(-1e38, 1e38, 12)]
    else:
        info.k = k.ravel().tolist()
        info.p = [0.0] * 12
    return info


class MessageMix:
    """Builds message ``i`` of a seeded run from its own generator, so a clean run can rebuild
    exactly the valid messages of the fuzz run without building the hostile ones."""

    def __init__(self, seed: int, transport: str, frames: list[np.ndarray], K: Intrinsics,
                 bad_model: Path) -> None:
        self.seed, self.transport, self.frames, self.K = seed, transport, frames, K
        self.bad_model = bad_model
        self._bomb: bytes | None = None
        self._encoded: dict[tuple[str, int], bytes] = {}
        raw = {"valid_rgb8": 20, "valid_bgr8_padded": 5, "valid_rgba8": 3, "valid_yuv422": 3,
               "valid_mono8": 2, "valid_extreme": 3, "unknown_encoding": 6,
               "depth_encoding_nan": 4, "truncated": 6, "oversized": 3, "huge_declared": 8,
               "bad_step": 4, "zero_size": 2, "odd_yuv": 2}
        compressed = {"valid_png": 18, "valid_jpeg": 18, "png_bomb": 5, "jpeg_huge_header": 5,
                      "jpeg_small_header": 3, "truncated": 8, "bitflip": 8, "garbage": 5,
                      "empty": 2, "foreign_format": 4}
        common = {"absurd_camera_info": 10, "unpaired_camera_info": 2, "frame_id_mismatch": 2,
                  "nan_model_swap": 0.5}
        weights = {**(raw if transport == "raw" else compressed), **common}
        self.kinds = list(weights)
        probs = np.array(list(weights.values()), dtype=np.float64)
        self.probs = probs / probs.sum()

    def kind(self, index: int) -> str:
        return str(self._rng(index).choice(self.kinds, p=self.probs))

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index])

    def build(self, index: int) -> Message:
        rng = self._rng(index)
        kind = str(rng.choice(self.kinds, p=self.probs))
        builder: Callable[[np.random.Generator], Message] = getattr(self, f"_{kind}")
        message = builder(rng)
        message.kind = kind
        return message

    # -- valid frames ---------------------------------------------------------------------
    def _frame(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        index = int(rng.integers(len(self.frames)))
        return index, self.frames[index]

    def _valid(self, image: Image | CompressedImage, content: str, kind: str = "") -> Message:
        return Message(kind, image, intrinsics_to_camera_info(self.K), content=content)

    def _valid_rgb8(self, rng: np.random.Generator) -> Message:
        f, rgb = self._frame(rng)
        return self._valid(rgb_to_image(rgb, "rgb8"), f"{f}/rgb")

    def _valid_bgr8_padded(self, rng: np.random.Generator) -> Message:
        f, rgb = self._frame(rng)
        bgr = rgb[..., ::-1]
        padded = np.zeros((bgr.shape[0], bgr.shape[1] * 3 + 13), np.uint8)
        padded[:, :bgr.shape[1] * 3] = bgr.reshape(bgr.shape[0], -1)
        msg = Image(height=bgr.shape[0], width=bgr.shape[1], encoding="bgr8",
                    is_bigendian=1, step=padded.shape[1], data=padded.tobytes())
        return self._valid(msg, f"{f}/rgb")  # uint8: byte order and padding change nothing

    def _valid_rgba8(self, rng: np.random.Generator) -> Message:
        f, rgb = self._frame(rng)
        return self._valid(rgb_to_image(rgb, "rgba8"), f"{f}/rgb")

    def _valid_yuv422(self, rng: np.random.Generator) -> Message:
        f, rgb = self._frame(rng)
        return self._valid(rgb_to_image(rgb, "yuv422"), f"{f}/yuv422")

    def _valid_mono8(self, rng: np.random.Generator) -> Message:
        f, rgb = self._frame(rng)
        return self._valid(rgb_to_image(rgb, "mono8"), f"{f}/mono8")

    def _valid_extreme(self, rng: np.random.Generator) -> Message:
        shape = self.frames[0].shape
        name = str(rng.choice(["black", "white", "noise"]))
        rgb = {"black": lambda: np.zeros(shape, np.uint8),
               "white": lambda: np.full(shape, 255, np.uint8),
               "noise": lambda: np.random.default_rng(7).integers(0, 256, shape, np.uint8)}[name]()
        return self._valid(rgb_to_image(rgb, "rgb8"), name)

    def _encoded_frame(self, fmt: str, f: int) -> bytes:
        if (fmt, f) not in self._encoded:
            self._encoded[fmt, f] = bytes(rgb_to_compressed(self.frames[f], fmt).data)
        return self._encoded[fmt, f]

    def _valid_png(self, rng: np.random.Generator) -> Message:
        f, _ = self._frame(rng)
        return self._valid(CompressedImage(format="png", data=self._encoded_frame("png", f)),
                           f"{f}/png")

    def _valid_jpeg(self, rng: np.random.Generator) -> Message:
        f, _ = self._frame(rng)
        return self._valid(CompressedImage(format="jpeg", data=self._encoded_frame("jpeg", f)),
                           f"{f}/jpeg")

    def warmup(self) -> Message:
        """A valid frame sent until the node answers (not part of the checked outputs)."""
        message = self._any_valid(np.random.default_rng(self.seed))
        message.kind, message.content = "warmup", ""
        return message

    def _any_valid(self, rng: np.random.Generator) -> Message:
        return self._valid_rgb8(rng) if self.transport == "raw" else self._valid_jpeg(rng)

    # -- raw transport ----------------------------------------------------------------------
    def _unknown_encoding(self, rng: np.random.Generator) -> Message:
        msg = self._valid_rgb8(rng)
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789_"))
        msg.image.encoding = str(rng.choice(["bayer_rggb8", "", "rgb16", "8UC3", "x" * 1000,
                                             "".join(rng.choice(letters, 12))]))
        msg.content = ""
        return msg

    def _depth_encoding_nan(self, rng: np.random.Generator) -> Message:
        h, w = self.frames[0].shape[:2]
        values = rng.choice(np.array([np.nan, np.inf, -np.inf, 1e38, 0.0], np.float32), (h, w))
        encoding = str(rng.choice(["32FC1", "16UC1"]))
        array = values if encoding == "32FC1" else rng.integers(0, 65536, (h, w), np.uint16)
        return Message("", numpy_to_image(array, encoding), intrinsics_to_camera_info(self.K))

    def _truncated(self, rng: np.random.Generator) -> Message:
        msg = self._any_valid(rng)
        data = bytes(msg.image.data)
        msg.image.data = data[:int(rng.integers(len(data)))]
        msg.content = ""
        return msg

    def _oversized(self, rng: np.random.Generator) -> Message:
        msg = self._valid_rgb8(rng)
        msg.image.data = bytes(msg.image.data) + bytes(int(rng.integers(1, 1 << 16)))
        msg.content = ""
        return msg

    def _huge_declared(self, rng: np.random.Generator) -> Message:
        sizes = [(1 << 32) - 1, 1 << 31, 100_000, 65_536, int(rng.integers(1, 1 << 32))]
        width, height = int(rng.choice(sizes)), int(rng.choice(sizes))
        step = int(rng.choice([(width * 3) % (1 << 32), int(rng.integers(0, 1 << 32))]))
        image = Image(width=width, height=height, step=step, encoding="rgb8",
                      data=rng.integers(0, 256, int(rng.integers(0, 4096)), np.uint8).tobytes())
        return Message("", image, intrinsics_to_camera_info(self.K))

    def _bad_step(self, rng: np.random.Generator) -> Message:
        msg = self._valid_rgb8(rng)
        row = msg.image.width * 3
        msg.image.step = int(rng.choice([0, 1, row - 1, row + 1, (1 << 32) - 1]))
        msg.content = ""
        return msg

    def _zero_size(self, rng: np.random.Generator) -> Message:
        msg = self._valid_rgb8(rng)
        if rng.integers(2):
            msg.image.width = 0
        else:
            msg.image.height = 0
        msg.content = ""
        return msg

    def _odd_yuv(self, rng: np.random.Generator) -> Message:
        h = self.frames[0].shape[0]
        image = Image(width=319, height=h, step=638, encoding="yuv422", data=bytes(638 * h))
        return Message("", image, intrinsics_to_camera_info(self.K))

    # -- compressed transport ---------------------------------------------------------------
    def _png_bomb(self, rng: np.random.Generator) -> Message:
        if self._bomb is None:
            self._bomb = png_bomb(BOMB_SIZE, BOMB_SIZE)
        return Message("", CompressedImage(format="png", data=self._bomb),
                       intrinsics_to_camera_info(self.K))

    def _jpeg_huge_header(self, rng: np.random.Generator) -> Message:
        f, _ = self._frame(rng)
        width, height = (int(v) for v in rng.integers(4097, 65536, 2))
        data = _resized_jpeg(self._encoded_frame("jpeg", f), width, height)
        return Message("", CompressedImage(format="jpeg", data=data),
                       intrinsics_to_camera_info(self.K))

    def _jpeg_small_header(self, rng: np.random.Generator) -> Message:
        f, _ = self._frame(rng)
        width, height = (int(v) for v in rng.integers(0, 400, 2))
        data = _resized_jpeg(self._encoded_frame("jpeg", f), width, height)
        return Message("", CompressedImage(format="jpeg", data=data),
                       intrinsics_to_camera_info(self.K))

    def _bitflip(self, rng: np.random.Generator) -> Message:
        msg = self._valid_png(rng) if rng.integers(2) else self._valid_jpeg(rng)
        data = np.frombuffer(bytes(msg.image.data), np.uint8).copy()
        at = rng.integers(0, data.size, int(rng.integers(1, 20)))
        data[at] ^= rng.integers(1, 256, at.size, dtype=np.uint8)
        msg.image.data = data.tobytes()
        msg.content = ""
        return msg

    def _garbage(self, rng: np.random.Generator) -> Message:
        prefix = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"\xff\xd8\xff\xc0"][int(rng.integers(4))]
        data = prefix + rng.integers(0, 256, int(rng.integers(1, 65536)), np.uint8).tobytes()
        if rng.integers(2):
            data += b"\xff\xd9"
        return Message("", CompressedImage(format="jpeg", data=data),
                       intrinsics_to_camera_info(self.K))

    def _empty(self, rng: np.random.Generator) -> Message:
        return Message("", CompressedImage(format="png", data=b""),
                       intrinsics_to_camera_info(self.K))

    def _foreign_format(self, rng: np.random.Generator) -> Message:
        f, rgb = self._frame(rng)
        ext = str(rng.choice([".bmp", ".tiff", ".ppm"]))
        ok, buf = cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]))
        data = buf.tobytes() if ok else b"GIF89a" + bytes(64)
        return Message("", CompressedImage(format=ext[1:], data=data),
                       intrinsics_to_camera_info(self.K))

    # -- camera_info and hot-swaps, either transport ----------------------------------------
    def _absurd_camera_info(self, rng: np.random.Generator) -> Message:
        msg = self._any_valid(rng)
        msg.info, msg.content = _absurd_info(self.K, rng), ""
        return msg

    def _unpaired_camera_info(self, rng: np.random.Generator) -> Message:
        msg = self._any_valid(rng)
        msg.info_offset_ns, msg.content = 1_000_000_000, ""
        return msg

    def _frame_id_mismatch(self, rng: np.random.Generator) -> Message:
        msg = self._any_valid(rng)
        msg.info_frame_id, msg.content = "another_optical_frame", ""
        return msg

    def _nan_model_swap(self, rng: np.random.Generator) -> Message:
        target = str(self.bad_model) if rng.integers(4) else "/nonexistent/model.onnx"
        return Message("", swap_to=target)


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


def demo_frames() -> tuple[list[np.ndarray], Intrinsics]:
    sequence = SimFolder(PACKAGED_SEQUENCE)
    frames = [sequence[i] for i in FRAME_IDS]
    return [f.rgb for f in frames], frames[0].intrinsics


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
            "valid_skipped": fuzz.valid_skipped[:20], "valid_skipped_count": len(fuzz.valid_skipped),
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
               f"{len(fuzz.drifted)} drifted, {len(vs_clean)} differ from the clean run; "
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
