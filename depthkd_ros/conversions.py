"""sensor_msgs <-> numpy, vectorised: Image, CompressedImage, CameraInfo, PointCloud2.

One implementation everywhere (no cv_bridge / sensor_msgs_py): the PyPI ROS
wheels ship neither, cv_bridge is a compiled extension tied to the system
NumPy, and two code paths would need two sets of tests to behave the same.
Every function here is a few numpy/OpenCV calls over whole buffers; nothing
loops over pixels.

Conventions: colour images come out as HxWx3 uint8 RGB; depth as HxW float32
metres with invalid = NaN; clouds as (H, W, 3) float32 in the optical frame.
"""

from __future__ import annotations

import array
import struct

import cv2
import numpy as np
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField
from std_msgs.msg import Header

from depthkd_core.geometry import Intrinsics

# encoding -> (numpy dtype, channels). ROS "yuv422" is UYVY byte order and
# "yuv422_yuy2" is YUYV (sensor_msgs/image_encodings.hpp); "uyvy"/"yuyv" are
# the newer spellings of the same two layouts.
ENCODINGS: dict[str, tuple[np.dtype, int]] = {
    "rgb8": (np.dtype(np.uint8), 3),
    "bgr8": (np.dtype(np.uint8), 3),
    "rgba8": (np.dtype(np.uint8), 4),
    "bgra8": (np.dtype(np.uint8), 4),
    "mono8": (np.dtype(np.uint8), 1),
    "yuv422": (np.dtype(np.uint8), 2),
    "uyvy": (np.dtype(np.uint8), 2),
    "yuv422_yuy2": (np.dtype(np.uint8), 2),
    "yuyv": (np.dtype(np.uint8), 2),
    "32FC1": (np.dtype(np.float32), 1),
    "16UC1": (np.dtype(np.uint16), 1),
}
COLOR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "yuv422", "uyvy",
                   "yuv422_yuy2", "yuyv")
DEPTH_ENCODINGS = ("32FC1", "16UC1")
# Largest image (pixels) any decode accepts, raw or compressed: 4096 x 4096 = 16.8 MP covers
# 4K UHD (8.3 MP) and 12 MP (4000 x 3000) sensors, while its decoded RGB stays ~50 MB. A
# PNG/JPEG declaring more is refused from its header, before a byte is decompressed.
MAX_DECODED_PIXELS = 4096 * 4096

_TO_RGB = {
    "bgr8": cv2.COLOR_BGR2RGB, "rgba8": cv2.COLOR_RGBA2RGB, "bgra8": cv2.COLOR_BGRA2RGB,
    "mono8": cv2.COLOR_GRAY2RGB, "yuv422": cv2.COLOR_YUV2RGB_UYVY,
    "uyvy": cv2.COLOR_YUV2RGB_UYVY, "yuv422_yuy2": cv2.COLOR_YUV2RGB_YUYV,
    "yuyv": cv2.COLOR_YUV2RGB_YUYV,
}
_FROM_RGB = {
    "bgr8": cv2.COLOR_RGB2BGR, "rgba8": cv2.COLOR_RGB2RGBA, "bgra8": cv2.COLOR_RGB2BGRA,
    "mono8": cv2.COLOR_RGB2GRAY, "yuv422": cv2.COLOR_RGB2YUV_UYVY,
    "uyvy": cv2.COLOR_RGB2YUV_UYVY, "yuv422_yuy2": cv2.COLOR_RGB2YUV_YUYV,
    "yuyv": cv2.COLOR_RGB2YUV_YUYV,
}


def stamp_ns(header: Header) -> int:
    """A header's stamp in integer nanoseconds (exact, unlike float seconds)."""
    return header.stamp.sec * 1_000_000_000 + header.stamp.nanosec


def _layout(encoding: str) -> tuple[np.dtype, int]:
    try:
        return ENCODINGS[encoding]
    except KeyError:
        raise ValueError(f"unsupported image encoding {encoding!r}; supported: "
                         f"{', '.join(ENCODINGS)}") from None


def image_to_numpy(msg: Image, max_pixels: int = MAX_DECODED_PIXELS) -> np.ndarray:
    """The pixels of ``msg`` in its own layout: (H, W) or (H, W, C), native byte order.

    Honours ``step`` (row padding) and ``is_bigendian``; raises ValueError on an
    unknown encoding, more than ``max_pixels`` pixels, a step shorter than a row,
    or data that is not ``step * height``.
    """
    dtype, channels = _layout(msg.encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ValueError(f"image has no pixels: {width}x{height}")
    _check_pixels(width, height, max_pixels, f"{msg.encoding} image")
    if channels == 2 and width % 2:
        raise ValueError(f"{msg.encoding} packs pixel pairs, so width must be even, got {width}")
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise ValueError(f"image step {step} is shorter than a {msg.encoding} row of "
                         f"{width} pixels ({row_bytes} bytes)")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size < step * height:
        raise ValueError(f"image data truncated: {data.size} bytes, expected step {step} x "
                         f"height {height} = {step * height}")
    if data.size > step * height:
        raise ValueError(f"image data size {data.size} does not match step {step} x "
                         f"height {height} = {step * height}")
    wire = dtype.newbyteorder(">" if msg.is_bigendian else "<")
    rows = data.reshape(height, step)[:, :row_bytes]
    pixels = np.ascontiguousarray(rows).view(wire).astype(dtype, copy=False)
    # Packed 4:2:2 comes out as (H, W, 2), the layout cv2.cvtColor expects.
    return pixels.reshape((height, width) if channels == 1 else (height, width, channels))


def _check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    if width * height > max_pixels:
        raise ValueError(f"{what} declares {width}x{height} = {width * height} pixels, more "
                         f"than max_decoded_pixels {max_pixels}")


def _pixels(msg: Image, encodings: tuple[str, ...], kind: str, max_pixels: int) -> np.ndarray:
    """``image_to_numpy`` of an image whose encoding must be one of ``encodings``."""
    if msg.encoding not in encodings:
        raise ValueError(f"image encoding {msg.encoding!r} is not a {kind} encoding; "
                         f"supported: {', '.join(encodings)}")
    return image_to_numpy(msg, max_pixels)


def numpy_to_image(array: np.ndarray, encoding: str, header: Header | None = None) -> Image:
    """Wrap an array already in ``encoding``'s layout as a dense (unpadded) Image."""
    dtype, channels = _layout(encoding)
    array = np.ascontiguousarray(array, dtype=dtype)
    expected_ndim = 2 if channels == 1 else 3
    if array.ndim != expected_ndim or (channels > 1 and array.shape[2] != channels):
        raise ValueError(f"array of shape {array.shape} does not fit encoding {encoding!r} "
                         f"({channels} channel(s))")
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(array.shape[0]), int(array.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(array.shape[1] * channels * dtype.itemsize)
    msg.data = array.astype(dtype.newbyteorder("<"), copy=False).tobytes()
    return msg


def image_to_rgb(msg: Image, max_pixels: int = MAX_DECODED_PIXELS) -> np.ndarray:
    """Any colour encoding in ``COLOR_ENCODINGS`` -> HxWx3 uint8 RGB."""
    pixels = _pixels(msg, COLOR_ENCODINGS, "colour", max_pixels)
    if msg.encoding == "rgb8":
        return pixels
    return cv2.cvtColor(pixels, _TO_RGB[msg.encoding])


def rgb_to_image(rgb: np.ndarray, encoding: str = "rgb8", header: Header | None = None) -> Image:
    """HxWx3 uint8 RGB -> Image in any colour encoding (for publishers, tests, the demo)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected HxWx3 uint8 RGB, got {rgb.dtype} array of shape {rgb.shape}")
    if encoding not in COLOR_ENCODINGS:
        raise ValueError(f"{encoding!r} is not a colour encoding; supported: "
                         f"{', '.join(COLOR_ENCODINGS)}")
    pixels = rgb if encoding == "rgb8" else cv2.cvtColor(np.ascontiguousarray(rgb),
                                                         _FROM_RGB[encoding])
    return numpy_to_image(pixels, encoding, header)


def depth_image_to_numpy(msg: Image, max_pixels: int = MAX_DECODED_PIXELS) -> np.ndarray:
    """32FC1 (metres) or 16UC1 (millimetres, 0 = invalid) -> HxW float32 metres, invalid NaN."""
    pixels = _pixels(msg, DEPTH_ENCODINGS, "depth (32FC1 m, 16UC1 mm)", max_pixels)
    if msg.encoding == "32FC1":
        return pixels.astype(np.float32, copy=False)
    depth = pixels.astype(np.float32) * np.float32(1e-3)
    depth[pixels == 0] = np.nan
    return depth


def depth_to_image(depth: np.ndarray, header: Header | None = None) -> Image:
    """HxW float depth in metres (NaN invalid) -> 32FC1 Image."""
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise ValueError(f"depth must be HxW, got shape {depth.shape}")
    return numpy_to_image(depth.astype(np.float32, copy=False), "32FC1", header)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic...): every
# 0xC0-0xCF except DHT (C4), JPG (C8) and DAC (CC), which are not frame headers.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and RST0-7 (SOI/EOI never occur between segments).
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
# Real JPEGs have a few dozen markers before the frame header; a stream of fill bytes or
# empty segments must not make the header scan (Python, per marker) a CPU sink.
_JPEG_MAX_MARKERS = 4096


def compressed_size(data: bytes | memoryview) -> tuple[str, int, int]:
    """(format, width, height) from a PNG's IHDR or a JPEG's SOFn header, without decoding.

    The bound a decoder cannot give: ``cv2.imdecode`` allocates whatever the header
    declares (OpenCV's own OPENCV_IO_MAX_IMAGE_PIXELS is one process-wide value read
    once), so a small file can claim gigabytes. ValueError for anything else, and for
    a JPEG without a frame header among its first 4096 markers.
    """
    if data[:8] == _PNG_SIGNATURE:
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ValueError("PNG has no IHDR header")
        width, height = struct.unpack(">II", data[16:24])
        return "png", width, height
    if data[:2] != b"\xff\xd8":
        raise ValueError("neither a PNG nor a JPEG (only those two are decoded)")
    pos = 2
    for _ in range(_JPEG_MAX_MARKERS):
        if pos + 4 > len(data):
            break
        if data[pos] != 0xFF:
            raise ValueError(f"JPEG has no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker == 0xDA:  # start of scan: image data follows, no frame header was seen
            break
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in _JPEG_SOF:
            if length < 7 or pos + 9 > len(data):
                raise ValueError("JPEG frame header is truncated")
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return "jpeg", width, height
        if length < 2:
            raise ValueError(f"JPEG segment at byte {pos} has length {length}")
        pos += 2 + length
    raise ValueError("JPEG has no frame (SOFn) header before its image data or within "
                     f"its first {_JPEG_MAX_MARKERS} markers")


def compressed_to_rgb(msg: CompressedImage, max_pixels: int = MAX_DECODED_PIXELS) -> np.ndarray:
    """Decode a jpeg/png CompressedImage -> HxWx3 uint8 RGB; ValueError when corrupt, of
    another format, or declaring more than ``max_pixels`` pixels in its header."""
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size == 0:
        raise ValueError(f"compressed image ({msg.format!r}) has no data")
    raw = memoryview(data)  # no copy of the whole buffer
    # libjpeg decodes a truncated stream with a grey bottom and only a warning,
    # so a JPEG must end in its EOI marker (allowing a little zero padding).
    if raw[:2] == b"\xff\xd8" and b"\xff\xd9" not in bytes(raw[-16:]):
        raise ValueError(f"compressed image ({msg.format!r}) is a truncated JPEG "
                         f"({data.size} bytes, no end-of-image marker)")
    try:
        fmt, width, height = compressed_size(raw)
    except ValueError as exc:
        raise ValueError(f"compressed image ({msg.format!r}, {data.size} bytes) could not be "
                         f"decoded: {exc}") from None
    if width == 0 or height == 0:
        raise ValueError(f"compressed image ({msg.format!r}) declares no pixels: "
                         f"{width}x{height}")
    _check_pixels(width, height, max_pixels, f"compressed image ({msg.format!r}, {fmt})")
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"compressed image ({msg.format!r}, {data.size} bytes) "
                         "could not be decoded")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_rgb(msg: Image | CompressedImage, max_pixels: int = MAX_DECODED_PIXELS) -> np.ndarray:
    """A camera frame of either transport -> HxWx3 uint8 RGB; ValueError says why not.

    The one decode the nodes call: no image larger than ``max_pixels`` is decoded.
    """
    if isinstance(msg, CompressedImage):
        return compressed_to_rgb(msg, max_pixels)
    return image_to_rgb(msg, max_pixels)


def rgb_to_compressed(rgb: np.ndarray, fmt: str = "jpeg",
                      header: Header | None = None, quality: int = 90) -> CompressedImage:
    """HxWx3 uint8 RGB -> CompressedImage (``fmt`` jpeg or png), as image_transport names it."""
    if fmt not in ("jpeg", "png"):
        raise ValueError(f"compressed format must be 'jpeg' or 'png', got {fmt!r}")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if fmt == "jpeg" else []
    ok, buf = cv2.imencode(".jpg" if fmt == "jpeg" else ".png",
                           cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode the image as {fmt}")
    msg = CompressedImage()
    if header is not None:
        msg.header = header
    msg.format = f"rgb8; {fmt} compressed bgr8"
    msg.data = buf.tobytes()
    return msg


def camera_info_to_intrinsics(msg: CameraInfo) -> Intrinsics:
    """Pinhole intrinsics of the image ``msg`` describes.

    Uses the projection matrix P (the rectified camera), as image_geometry and
    depth_image_proc do, and falls back to K when P is unset (all zeros), as
    simple drivers leave it. ValueError names the problem (zeros, NaN, size).
    """
    p = np.asarray(msg.p, dtype=np.float64).reshape(3, 4)
    k = np.asarray(msg.k, dtype=np.float64).reshape(3, 3)
    matrix, name = (p[:, :3], "P") if np.any(p) else (k, "K")
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"camera_info {name} has non-finite entries: {matrix.ravel().tolist()}")
    if matrix[0, 0] <= 0 or matrix[1, 1] <= 0:
        raise ValueError(f"camera_info {name} has fx={matrix[0, 0]:g}, fy={matrix[1, 1]:g}; "
                         "both must be > 0 (uncalibrated camera?)")
    if msg.width <= 0 or msg.height <= 0:
        raise ValueError(f"camera_info size is {msg.width}x{msg.height}; must be > 0")
    return Intrinsics(fx=matrix[0, 0], fy=matrix[1, 1], cx=matrix[0, 2], cy=matrix[1, 2],
                      width=int(msg.width), height=int(msg.height))


def intrinsics_to_camera_info(K: Intrinsics, header: Header | None = None) -> CameraInfo:
    """Intrinsics -> CameraInfo of an undistorted pinhole image: D = 0, R = I, P = [K | 0]."""
    msg = CameraInfo()
    if header is not None:
        msg.header = header
    msg.width, msg.height = int(K.width), int(K.height)
    msg.distortion_model = "plumb_bob"
    msg.d = [0.0] * 5
    msg.k = K.matrix().ravel().tolist()
    msg.r = np.eye(3).ravel().tolist()
    msg.p = np.hstack([K.matrix(), np.zeros((3, 1))]).ravel().tolist()
    return msg


def _field(name: str, offset: int) -> PointField:
    return PointField(name=name, offset=offset, datatype=PointField.FLOAT32, count=1)


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) RGB -> uint32 0x00RRGGBB: the bits of PCL's/RViz's FLOAT32 ``rgb`` field.

    Kept as uint32 (never converted as a float) because the packed values are
    float denormals, which flush-to-zero maths modes would erase.
    """
    rgb = np.asarray(rgb, dtype=np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def points_to_pointcloud2(points: np.ndarray, header: Header | None = None,
                          rgb: np.ndarray | None = None) -> PointCloud2:
    """Organized (H, W, 3) float32 points (+ optional HxWx3 uint8 RGB) -> PointCloud2.

    Fields x, y, z (+ rgb) FLOAT32, point_step 12 (16), height H, width W,
    is_dense false (NaN marks invalid points). One structured-array fill.
    """
    points = np.asarray(points)
    if points.ndim != 3 or points.shape[2] != 3:
        raise ValueError(f"points must be (H, W, 3), got shape {points.shape}")
    if rgb is not None and np.shape(rgb) != points.shape:
        raise ValueError(f"rgb shape {np.shape(rgb)} does not match points shape {points.shape}")
    names = ["x", "y", "z"] + (["rgb"] if rgb is not None else [])
    formats = ["<f4", "<f4", "<f4", "<u4"][:len(names)]
    dtype = np.dtype({"names": names, "formats": formats})
    # Fill the message's own byte buffer in place: assigning bytes to msg.data
    # would cost two more copies of a cloud that is ~5 MB at VGA.
    data = array.array("B", bytes(dtype.itemsize * points.shape[0] * points.shape[1]))
    cloud = np.frombuffer(data, dtype=dtype).reshape(points.shape[:2])
    for axis, name in enumerate("xyz"):
        cloud[name] = points[..., axis]
    if rgb is not None:
        cloud["rgb"] = pack_rgb(rgb)
    msg = PointCloud2()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(points.shape[0]), int(points.shape[1])
    msg.fields = [_field(name, 4 * i) for i, name in enumerate(names)]
    msg.is_bigendian = False
    msg.point_step = 4 * len(names)
    msg.row_step = msg.point_step * msg.width
    msg.is_dense = False
    msg.data = data
    return msg


def pointcloud2_to_numpy(msg: PointCloud2) -> tuple[np.ndarray, np.ndarray | None]:
    """PointCloud2 (FLOAT32 x, y, z, optional rgb) -> (H, W, 3) float32 points, RGB or None."""
    fields = {f.name: f for f in msg.fields}
    for name in ("x", "y", "z"):
        if name not in fields or fields[name].datatype != PointField.FLOAT32:
            raise ValueError(f"point cloud has no FLOAT32 field {name!r}")
    names = [n for n in ("x", "y", "z", "rgb") if n in fields]
    order = ">" if msg.is_bigendian else "<"
    formats = [order + code for code in ("f4", "f4", "f4", "u4")][:len(names)]
    dtype = np.dtype({"names": names, "formats": formats,
                      "offsets": [fields[n].offset for n in names],
                      "itemsize": int(msg.point_step)})
    height, width = int(msg.height), int(msg.width)
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size != msg.row_step * height or msg.row_step < msg.point_step * width:
        raise ValueError(f"point cloud data is {data.size} bytes, expected row_step "
                         f"{msg.row_step} x height {height}")
    rows = np.ascontiguousarray(data.reshape(height, msg.row_step)[:, :msg.point_step * width])
    cloud = rows.view(dtype).reshape(height, width)
    points = np.stack([cloud[n].astype(np.float32) for n in "xyz"], axis=-1)
    if "rgb" not in fields:
        return points, None
    packed = cloud["rgb"].astype(np.uint32)
    rgb = np.stack([(packed >> shift) & 0xFF for shift in (16, 8, 0)], axis=-1)
    return points, rgb.astype(np.uint8)
