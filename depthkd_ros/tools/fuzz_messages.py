"""What `depthkd fuzz-node` sends: hostile payloads and a seeded mix of messages.

``MessageMix.build(i)`` makes message ``i`` of a run from its own generator, so a
clean run can rebuild exactly the valid messages of a fuzz run. Valid frames name
their ``content``: the same content must always give the same depth.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from depthkd_core.data.readers import SimFolder
from depthkd_core.geometry import Intrinsics
from depthkd_ros.conversions import (intrinsics_to_camera_info, numpy_to_image,
                                     rgb_to_compressed, rgb_to_image)
from depthkd_ros.tools.demo import PACKAGED_SEQUENCE

TRANSPORTS = ("raw", "compressed")
BOMB_SIZE = 16000  # a 748 KB PNG that decodes to 768 MB
FRAME_IDS = (0, 8, 16, 24)  # the demo frames the valid messages show


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
        # Half the 1 s between two messages' stamps: never another message's stamp.
        msg.info_offset_ns, msg.content = 500_000_000, ""
        return msg

    def _frame_id_mismatch(self, rng: np.random.Generator) -> Message:
        msg = self._any_valid(rng)
        msg.info_frame_id, msg.content = "another_optical_frame", ""
        return msg

    def _nan_model_swap(self, rng: np.random.Generator) -> Message:
        target = str(self.bad_model) if rng.integers(4) else "/nonexistent/model.onnx"
        return Message("", swap_to=target)


def demo_frames() -> tuple[list[np.ndarray], Intrinsics]:
    sequence = SimFolder(PACKAGED_SEQUENCE)
    frames = [sequence[i] for i in FRAME_IDS]
    return [f.rgb for f in frames], frames[0].intrinsics
