"""Camera images from rosbag2 recordings (MCAP or sqlite3 storage) via ``rosbags``.

Needs no ROS install: ``rosbags``' AnyReader parses the bag and deserialises CDR
with the message definitions stored in the bag, else ROS 2 Kilted's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from depthkd_core.data.frame import Frame
from depthkd_core.data.readers import READERS, FrameReader
from depthkd_core.geometry import Intrinsics

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
CAMERA_INFO = "sensor_msgs/msg/CameraInfo"
# encoding -> (channels, channel order turning the stored pixels into RGB)
_RAW_ENCODINGS = {"rgb8": (3, [0, 1, 2]), "bgr8": (3, [2, 1, 0]), "rgba8": (4, [0, 1, 2]),
                  "bgra8": (4, [2, 1, 0]), "mono8": (1, [0, 0, 0])}


def _open_reader(path: Path) -> Any:
    from rosbags.highlevel import AnyReader  # optional dependency (extra "data")
    from rosbags.typesys import Stores, get_typestore

    reader = AnyReader([path], default_typestore=get_typestore(Stores.ROS2_KILTED))
    reader.open()
    return reader


def decode_image(msg: Any) -> np.ndarray:
    """A deserialised ``sensor_msgs/Image`` (rgb8, bgr8, rgba8, bgra8, mono8) as HxWx3 RGB."""
    if msg.encoding not in _RAW_ENCODINGS:
        raise ValueError(f"unsupported image encoding {msg.encoding!r}; "
                         f"supported: {', '.join(_RAW_ENCODINGS)}")
    channels, order = _RAW_ENCODINGS[msg.encoding]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    data = np.asarray(msg.data, dtype=np.uint8)
    if step < w * channels or data.size < h * step:
        raise ValueError(f"image message of {w}x{h} {msg.encoding} has step {step} and "
                         f"{data.size} bytes; too few")
    pixels = data[: h * step].reshape(h, step)[:, : w * channels].reshape(h, w, channels)
    return np.ascontiguousarray(pixels[..., order])


def decode_compressed(msg: Any) -> np.ndarray:
    """A deserialised ``sensor_msgs/CompressedImage`` (jpeg or png) as HxWx3 RGB."""
    bgr = cv2.imdecode(np.asarray(msg.data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot decode compressed image (format {msg.format!r})")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@READERS.register("rosbag")
class RosbagImages(FrameReader):
    """Frames of one ``Image`` or ``CompressedImage`` topic of a rosbag2 folder or file.

    ``topic`` may be omitted when the bag has exactly one image topic. Intrinsics come
    from the first message of ``info_topic`` (default: the sibling ``camera_info``
    topic, when the bag has one), else None. Frames are indexed by receive
    timestamp; the bag stays open, once per process.
    """

    def __init__(self, path: str | Path, topic: str | None = None,
                 info_topic: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"RosbagImages: no such bag: {self.path}")
        self._reader: Any = None
        self._pid = -1
        reader = self._handle()
        topics = {name: t.msgtype for name, t in reader.topics.items()}
        images = sorted(name for name, kind in topics.items() if kind in (IMAGE, COMPRESSED))
        if topic is None and len(images) == 1:
            topic = images[0]
        if topic not in images:
            raise ValueError(f"RosbagImages: image topic {topic!r} not in {self.path}; "
                             f"image topics: {', '.join(images) or 'none'}")
        self.topic, self.msgtype = topic, topics[topic]
        self._connections = [c for c in reader.connections if c.topic == topic]
        # (timestamp, rank among messages sharing that timestamp) identifies a message
        seen: dict[int, int] = {}
        self.items = []
        for _, stamp, _ in reader.messages(connections=self._connections):
            self.items.append((stamp, seen.get(stamp, 0)))
            seen[stamp] = seen.get(stamp, 0) + 1
        if not self.items:
            raise ValueError(f"RosbagImages: topic {topic} of {self.path} has no messages")
        self.camera = self._camera_info(reader, topics, info_topic)

    def _camera_info(self, reader: Any, topics: dict[str, str],
                     info_topic: str | None) -> tuple[np.ndarray, int, int] | None:
        if info_topic is None:
            sibling = self.topic.rsplit("/", 1)[0] + "/camera_info"
            if topics.get(sibling) != CAMERA_INFO:
                return None
            info_topic = sibling
        if topics.get(info_topic) != CAMERA_INFO:
            infos = sorted(n for n, k in topics.items() if k == CAMERA_INFO)
            raise ValueError(f"RosbagImages: camera_info topic {info_topic!r} not in {self.path}; "
                             f"CameraInfo topics: {', '.join(infos) or 'none'}")
        conns = [c for c in reader.connections if c.topic == info_topic]
        for conn, _, raw in reader.messages(connections=conns):
            msg = reader.deserialize(raw, conn.msgtype)
            return np.asarray(msg.k, dtype=np.float64), int(msg.width), int(msg.height)
        return None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_reader"], state["_pid"] = None, -1   # an open bag does not survive pickling
        return state

    def _handle(self) -> Any:
        if self._reader is None or self._pid != os.getpid():
            self._reader = _open_reader(self.path)
            self._pid = os.getpid()
        return self._reader

    def load(self, item: tuple[int, int]) -> Frame:
        stamp, rank = item
        reader = self._handle()
        messages = reader.messages(connections=self._connections, start=stamp, stop=stamp + 1)
        for i, (conn, _, raw) in enumerate(messages):
            if i == rank:
                msg = reader.deserialize(raw, conn.msgtype)
                break
        else:
            raise ValueError(f"RosbagImages: message at {stamp} ns vanished from {self.path}")
        rgb = decode_compressed(msg) if self.msgtype == COMPRESSED else decode_image(msg)
        return Frame(rgb=rgb, intrinsics=self._intrinsics(rgb), name=str(stamp))

    def _intrinsics(self, rgb: np.ndarray) -> Intrinsics | None:
        if self.camera is None:
            return None
        k, width, height = self.camera
        h, w = rgb.shape[:2]
        if (width, height) not in ((0, 0), (w, h)):
            raise ValueError(f"RosbagImages: camera_info size {width}x{height} does not match "
                             f"image size {w}x{h} on {self.topic}")
        return Intrinsics.from_matrix(k, w, h)
