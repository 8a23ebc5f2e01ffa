"""sensor_msgs <-> numpy conversions: hand-made byte layouts, round trips, every error path."""

from __future__ import annotations

import struct
import time

import cv2
import numpy as np
import pytest

pytest.importorskip("sensor_msgs.msg")
pytestmark = pytest.mark.ros

from sensor_msgs.msg import (CameraInfo, CompressedImage, Image, PointCloud2,
                             PointField)
from std_msgs.msg import Header

from depthkd_core.geometry import Intrinsics
from depthkd_ros.conversions import (COLOR_ENCODINGS, MAX_DECODED_PIXELS,
                                     camera_info_to_intrinsics, compressed_size,
                                     compressed_to_rgb, decode_rgb, depth_image_to_numpy,
                                     depth_to_image, image_to_numpy, image_to_rgb,
                                     intrinsics_to_camera_info, numpy_to_image,
                                     pointcloud2_to_numpy, points_to_pointcloud2,
                                     rgb_to_compressed, rgb_to_image)
from depthkd_ros.tools.fuzz_messages import png_bomb


def _pairs_rgb(height: int = 4, width: int = 6, seed: int = 0) -> np.ndarray:
    """Random RGB whose horizontal pixel pairs share a colour, so 4:2:2 chroma is lossless."""
    half = np.random.default_rng(seed).integers(0, 256, (height, width // 2, 3), dtype=np.uint8)
    return np.repeat(half, 2, axis=1)


def _raw(encoding: str, data: bytes, height: int, width: int, step: int,
         bigendian: bool = False) -> Image:
    return Image(height=height, width=width, encoding=encoding, step=step,
                 is_bigendian=int(bigendian), data=data)


def _header(sec: int = 12, frame: str = "cam") -> Header:
    header = Header(frame_id=frame)
    header.stamp.sec, header.stamp.nanosec = sec, 345
    return header


def test_byte_layouts_by_hand() -> None:
    px = np.array([[[10, 20, 30]]], dtype=np.uint8)
    assert bytes(rgb_to_image(px, "rgb8").data) == bytes([10, 20, 30])
    assert bytes(rgb_to_image(px, "bgr8").data) == bytes([30, 20, 10])
    assert bytes(rgb_to_image(px, "rgba8").data) == bytes([10, 20, 30, 255])
    assert bytes(rgb_to_image(px, "bgra8").data) == bytes([30, 20, 10, 255])
    # Black then white: BT.601 limited range Y 16/235, neutral chroma 128.
    bw = np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8)
    assert bytes(rgb_to_image(bw, "yuv422").data) == bytes([128, 16, 128, 235])  # UYVY
    assert bytes(rgb_to_image(bw, "yuv422_yuy2").data) == bytes([16, 128, 235, 128])  # YUYV
    msg = rgb_to_image(bw, "yuv422")
    assert (msg.step, msg.width, msg.height) == (4, 2, 1)


@pytest.mark.parametrize("encoding", COLOR_ENCODINGS)
def test_colour_round_trip(encoding: str) -> None:
    rgb = _pairs_rgb()
    if encoding == "mono8":
        rgb = np.repeat(rgb[..., :1], 3, axis=2)  # grey survives mono8 exactly
    msg = rgb_to_image(rgb, encoding, _header())
    back = image_to_rgb(msg)
    assert back.shape == rgb.shape and back.dtype == np.uint8
    tolerance = 6 if encoding in ("yuv422", "uyvy", "yuv422_yuy2", "yuyv") else 0
    assert np.abs(back.astype(int) - rgb.astype(int)).max() <= tolerance
    assert msg.header.stamp.sec == 12 and msg.header.frame_id == "cam"


def test_uyvy_and_yuyv_are_not_confused() -> None:
    # Y0 bright, Y1 dark, neutral chroma: the byte order decides which pixel is white.
    uyvy = _raw("yuv422", bytes([128, 235, 128, 16]), 1, 2, 4)
    yuyv = _raw("yuyv", bytes([235, 128, 16, 128]), 1, 2, 4)
    for msg in (uyvy, yuyv):
        rgb = image_to_rgb(msg)
        assert rgb[0, 0].min() >= 250 and rgb[0, 1].max() <= 5


def test_row_padding_is_skipped() -> None:
    rgb = _pairs_rgb(3, 4)
    step = 4 * 3 + 5
    rows = [rgb[r].tobytes() + b"\xab" * 5 for r in range(3)]
    back = image_to_rgb(_raw("rgb8", b"".join(rows), 3, 4, step))
    np.testing.assert_array_equal(back, rgb)


def test_depth_encodings_and_endianness() -> None:
    metres = np.array([[1.5, np.nan], [0.25, 7.0]], dtype=np.float32)
    for big in (False, True):
        data = metres.astype(">f4" if big else "<f4").tobytes()
        out = depth_image_to_numpy(_raw("32FC1", data, 2, 2, 8, big))
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, metres)
    mm = np.array([[1000, 0], [2500, 65535]], dtype=np.uint16)
    expected = np.array([[1.0, np.nan], [2.5, 65.535]], dtype=np.float32)
    for big in (False, True):
        data = mm.astype(">u2" if big else "<u2").tobytes()
        out = depth_image_to_numpy(_raw("16UC1", data, 2, 2, 4, big))
        np.testing.assert_allclose(out, expected, rtol=1e-6)
    # 16UC1 rows padded to 8 bytes.
    padded = b"".join(mm[r].astype("<u2").tobytes() + b"\0" * 4 for r in range(2))
    np.testing.assert_allclose(depth_image_to_numpy(_raw("16UC1", padded, 2, 2, 8)), expected)


def test_depth_to_image_round_trip() -> None:
    depth = np.arange(12, dtype=np.float32).reshape(3, 4) / 4
    depth[1, 2] = np.nan
    msg = depth_to_image(depth, _header())
    assert (msg.encoding, msg.step, msg.is_bigendian) == ("32FC1", 16, 0)
    np.testing.assert_array_equal(depth_image_to_numpy(msg), depth)
    assert image_to_numpy(msg).shape == (3, 4)


@pytest.mark.parametrize("msg, match", [
    (_raw("bayer_rggb8", bytes(4), 2, 2, 2), "'bayer_rggb8'"),
    (_raw("rgb8", bytes(18), 2, 4, 9), "step 9 is shorter"),
    (_raw("rgb8", bytes(20), 2, 4, 12), "truncated"),
    (_raw("rgb8", bytes(30), 2, 4, 12), "does not match"),
    (_raw("yuv422", bytes(6), 1, 3, 6), "width must be even"),
    (_raw("rgb8", b"", 0, 4, 12), "no pixels"),
])
def test_bad_images_raise(msg: Image, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        image_to_rgb(msg)


def test_wrong_kind_of_image_raises() -> None:
    with pytest.raises(ValueError, match="unsupported image encoding 'bayer_rggb8'"):
        image_to_numpy(_raw("bayer_rggb8", bytes(4), 2, 2, 2))
    with pytest.raises(ValueError, match="not a colour encoding"):
        image_to_rgb(depth_to_image(np.ones((2, 2), np.float32)))
    with pytest.raises(ValueError, match="32FC1"):
        depth_image_to_numpy(rgb_to_image(_pairs_rgb()))
    with pytest.raises(ValueError, match="does not fit"):
        numpy_to_image(np.zeros((2, 2), np.uint8), "rgb8")


def test_compressed_round_trip_and_corruption() -> None:
    yy, xx = np.mgrid[0:48, 0:64]
    rgb = np.stack([xx * 4, yy * 5, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    png = rgb_to_compressed(rgb, "png", _header())
    np.testing.assert_array_equal(compressed_to_rgb(png), rgb)
    jpeg = rgb_to_compressed(rgb, "jpeg")
    assert jpeg.format == "rgb8; jpeg compressed bgr8"
    assert np.abs(compressed_to_rgb(jpeg).astype(int) - rgb).mean() < 3.0
    data = bytes(jpeg.data)
    with pytest.raises(ValueError, match="truncated JPEG"):
        compressed_to_rgb(CompressedImage(format="jpeg", data=data[: len(data) // 2]))
    with pytest.raises(ValueError, match="could not be decoded"):
        compressed_to_rgb(CompressedImage(format="jpeg", data=b"not an image at all" * 10))
    with pytest.raises(ValueError, match="no data"):
        compressed_to_rgb(CompressedImage(format="png"))


def _resized_header(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with the size in its SOF0 frame header replaced (the scan data unchanged)."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[:sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9:]


def test_compressed_size_from_headers_only() -> None:
    rgb = _pairs_rgb(30, 50)
    assert compressed_size(bytes(rgb_to_compressed(rgb, "png").data)) == ("png", 50, 30)
    assert compressed_size(bytes(rgb_to_compressed(rgb, "jpeg").data)) == ("jpeg", 50, 30)
    ok, progressive = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok and compressed_size(progressive.tobytes()) == ("jpeg", 50, 30)  # SOF2
    ok, bmp = cv2.imencode(".bmp", rgb)
    for other, match in ((bmp.tobytes(), "neither a PNG nor a JPEG"),
                         (b"GIF89a" + bytes(20), "neither a PNG nor a JPEG"),
                         (b"\xff\xd8\xff\xda" + bytes(20), "no frame"),
                         (b"\x89PNG\r\n\x1a\n" + bytes(4), "no IHDR"),
                         (b"\xff\xd8" + b"\xff" * 1_000_000 + b"\xff\xd9", "first 4096 markers")):
        with pytest.raises(ValueError, match=match):
            compressed_size(other)


def test_decompression_bombs_are_refused_before_decoding() -> None:
    """A real 20 MP black PNG of 58 KB: refused from its header, before it is inflated."""
    bomb = CompressedImage(format="png", data=png_bomb(5000, 4000))
    assert 5000 * 4000 > MAX_DECODED_PIXELS
    start = time.perf_counter()
    with pytest.raises(ValueError, match="declares 5000x4000 = 20000000 pixels, more than "
                                         "max_decoded_pixels 16777216"):
        compressed_to_rgb(bomb)
    assert time.perf_counter() - start < 0.05  # nothing was decompressed
    assert compressed_to_rgb(bomb, max_pixels=5000 * 4000).shape == (4000, 5000, 3)
    jpeg = bytes(rgb_to_compressed(_pairs_rgb(16, 16), "jpeg").data)
    with pytest.raises(ValueError, match="declares 60000x50000"):
        decode_rgb(CompressedImage(format="jpeg", data=_resized_header(jpeg, 60000, 50000)))
    with pytest.raises(ValueError, match="max_decoded_pixels 100"):
        decode_rgb(rgb_to_compressed(_pairs_rgb(16, 16), "png"), max_pixels=100)


@pytest.mark.parametrize("msg, match", [
    (_raw("rgb8", bytes(12), 100_000, 100_000, 300_000), "declares 100000x100000"),
    (_raw("rgb8", bytes(12), 2, 4_294_967_295, 12), "declares 4294967295x2"),
    (_raw("rgb8", bytes(12), 1, 4, 4_294_967_295), "truncated"),
])
def test_absurd_raw_sizes_are_refused(msg: Image, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_rgb(msg)


def test_decode_rgb_takes_either_transport() -> None:
    rgb = _pairs_rgb(8, 10)
    np.testing.assert_array_equal(decode_rgb(rgb_to_image(rgb, "bgr8")), rgb)
    np.testing.assert_array_equal(decode_rgb(rgb_to_compressed(rgb, "png")), rgb)
    with pytest.raises(ValueError, match="max_decoded_pixels 79"):
        decode_rgb(rgb_to_image(rgb), max_pixels=79)


def test_camera_info_to_intrinsics() -> None:
    info = CameraInfo(width=640, height=480)
    info.k = [525.0, 0.0, 319.5, 0.0, 520.0, 239.5, 0.0, 0.0, 1.0]
    assert camera_info_to_intrinsics(info) == Intrinsics(525.0, 520.0, 319.5, 239.5, 640, 480)
    # A rectified camera: P wins, as image_geometry reads it.
    info.p = [500.0, 0.0, 320.0, 0.0, 0.0, 501.0, 240.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert camera_info_to_intrinsics(info) == Intrinsics(500.0, 501.0, 320.0, 240.0, 640, 480)
    with pytest.raises(ValueError, match="fx=0"):
        camera_info_to_intrinsics(CameraInfo(width=640, height=480))
    nan_info = CameraInfo(width=640, height=480)
    nan_info.k = [np.nan, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="non-finite"):
        camera_info_to_intrinsics(nan_info)
    info.width = 0
    with pytest.raises(ValueError, match="size"):
        camera_info_to_intrinsics(info)


def test_intrinsics_to_camera_info_is_consistent() -> None:
    K = Intrinsics(fx=100.0, fy=110.0, cx=31.5, cy=23.5, width=64, height=48)
    msg = intrinsics_to_camera_info(K, _header(7, "optical"))
    assert (msg.width, msg.height, msg.header.frame_id, msg.header.stamp.sec) == (64, 48,
                                                                                   "optical", 7)
    assert list(msg.k) == [100.0, 0.0, 31.5, 0.0, 110.0, 23.5, 0.0, 0.0, 1.0]
    assert list(msg.p) == [100.0, 0.0, 31.5, 0.0, 0.0, 110.0, 23.5, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert list(msg.r) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert list(msg.d) == [0.0] * 5 and msg.distortion_model == "plumb_bob"
    assert camera_info_to_intrinsics(msg) == K


def test_pointcloud2_layout_by_hand() -> None:
    points = np.array([[[1.0, 2.0, 3.0], [np.nan] * 3, [-1.0, 0.5, 2.0]],
                       [[0.0, 0.0, 1.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]], dtype=np.float32)
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 128, 1)
    msg = points_to_pointcloud2(points, _header(), rgb)
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (2, 3, 16, 48)
    assert msg.is_dense is False and msg.is_bigendian is False
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == [
        ("x", 0, PointField.FLOAT32, 1), ("y", 4, PointField.FLOAT32, 1),
        ("z", 8, PointField.FLOAT32, 1), ("rgb", 12, PointField.FLOAT32, 1)]
    data = bytes(msg.data)
    assert len(data) == 2 * 3 * 16
    assert struct.unpack("<3f", data[:12]) == (1.0, 2.0, 3.0)
    assert data[12:16] == bytes([0x01, 0x80, 0xFF, 0x00])  # 0x00FF8001 little-endian
    back, back_rgb = pointcloud2_to_numpy(msg)
    np.testing.assert_array_equal(back, points)
    np.testing.assert_array_equal(back_rgb, rgb)
    plain = points_to_pointcloud2(points)
    assert plain.point_step == 12 and len(plain.fields) == 3 and len(plain.data) == 72
    assert pointcloud2_to_numpy(plain)[1] is None


def test_pointcloud2_reader_handles_padding_and_big_endian() -> None:
    # PCL-style layout: x y z pad rgb pad*3 (32 bytes), big-endian, one row of 2.
    rows = b""
    for xyz, colour in (((1.0, 2.0, 3.0), 0x00102030), ((4.0, 5.0, 6.0), 0x00FFFFFF)):
        rows += struct.pack(">3f4xI12x", *xyz, colour)
    fields = [PointField(name=n, offset=o, datatype=PointField.FLOAT32, count=1)
              for n, o in (("x", 0), ("y", 4), ("z", 8), ("rgb", 16))]
    msg = PointCloud2(height=1, width=2, fields=fields, is_bigendian=True, point_step=32,
                      row_step=64, data=rows, is_dense=True)
    points, rgb = pointcloud2_to_numpy(msg)
    np.testing.assert_array_equal(points, [[[1, 2, 3], [4, 5, 6]]])
    np.testing.assert_array_equal(rgb, [[[0x10, 0x20, 0x30], [255, 255, 255]]])
    msg.data = rows[:40]
    with pytest.raises(ValueError, match="expected row_step"):
        pointcloud2_to_numpy(msg)


def test_full_frame_cloud_is_vectorised() -> None:
    # A per-point Python loop over 307k points takes seconds; one structured fill, ~10 ms.
    points = np.random.default_rng(1).random((480, 640, 3), dtype=np.float32)
    rgb = np.zeros((480, 640, 3), dtype=np.uint8)
    start = time.perf_counter()
    msg = points_to_pointcloud2(points, None, rgb)
    assert time.perf_counter() - start < 1.0
    assert len(msg.data) == 480 * 640 * 16
