"""Readers on small real files of each format, the real TUM frame, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from depthkd_core.data import (READERS, Frame, ImageFolder, KittiDepth, NyuMat, NyuPngFolder,
                               RosbagImages, SimFolder, TumFolder, build_reader)
from depthkd_core.geometry import Intrinsics

from helpers import TUM as TUM_SAMPLE


def _rgb(h: int = 12, w: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _save_u16(path: Path, value: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), value.astype(np.uint16))


def _depth_raw(h: int = 12, w: int = 16, seed: int = 1) -> np.ndarray:
    raw = np.random.default_rng(seed).integers(1, 60000, (h, w)).astype(np.uint16)
    raw[0, :3] = 0   # invalid pixels stay 0
    return raw


def test_registry_lists_every_reader():
    assert READERS.keys() == ["images", "kitti", "nyu_mat", "nyu_png", "rosbag", "sim", "tum"]
    with pytest.raises(KeyError, match="unknown reader 'nope'"):
        build_reader("nope", ".")


def test_image_folder_natural_order_pixels_and_intrinsics(tmp_path):
    images = {name: _rgb(seed=i) for i, name in enumerate(["img10.png", "img2.png", "a.png"])}
    for name, rgb in images.items():
        _save_rgb(tmp_path / name, rgb)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "intrinsics.json").write_text(json.dumps(
        {"fx": 20.0, "fy": 21.0, "cx": 7.5, "cy": 5.5, "width": 16, "height": 12}))
    reader = build_reader("images", tmp_path)
    assert isinstance(reader, ImageFolder)
    assert [f.name for f in reader] == ["a", "img2", "img10"]
    np.testing.assert_array_equal(reader[1].rgb, images["img2.png"])
    np.testing.assert_array_equal(reader[-1].rgb, images["img10.png"])
    assert reader[0].depth is None
    assert reader[0].intrinsics == Intrinsics(20.0, 21.0, 7.5, 5.5, 16, 12)
    with pytest.raises(IndexError, match="3 frames"):
        reader[3]
    chosen = build_reader("images", tmp_path, names=["img10.png", "a.png"])
    assert [f.name for f in chosen] == ["img10", "a"]
    with pytest.raises(FileNotFoundError, match=r"\['gone.png'\] not in"):
        build_reader("images", tmp_path, names=["a.png", "gone.png"])


def test_tum_lists_associate_by_timestamp(tmp_path):
    rgb_t, depth_t = [1.000, 1.033, 1.066, 2.000], [1.004, 1.030, 1.070, 2.500]
    lines_rgb, lines_depth, raws = ["# color images"], ["# depth maps"], []
    for i, (tr, td) in enumerate(zip(rgb_t, depth_t)):
        _save_rgb(tmp_path / "rgb" / f"{tr:.6f}.png", _rgb(seed=i))
        raws.append(_depth_raw(seed=10 + i))
        _save_u16(tmp_path / "depth" / f"{td:.6f}.png", raws[-1])
        lines_rgb.append(f"{tr:.6f} rgb/{tr:.6f}.png")
        lines_depth.append(f"{td:.6f} depth/{td:.6f}.png")
    (tmp_path / "rgb.txt").write_text("\n".join(lines_rgb))
    (tmp_path / "depth.txt").write_text("\n".join(lines_depth))
    reader = build_reader("tum", tmp_path)
    assert len(reader) == 3   # 2.000 has no depth within 0.02 s
    np.testing.assert_array_equal(reader[1].rgb, _rgb(seed=1))
    np.testing.assert_allclose(reader[1].depth, raws[1] / 5000.0, rtol=1e-6)
    assert reader[2].depth[0, 0] == 0.0
    # scaled from TUM's 640x480 camera to this 16x12 image
    assert reader[0].intrinsics.fx == pytest.approx(525.0 * 16 / 640)
    # the same folders without the lists pair by the timestamps in the file names
    (tmp_path / "rgb.txt").unlink()
    folders = TumFolder(tmp_path, intrinsics={"fx": 9.0, "fy": 9.0, "cx": 7.5, "cy": 5.5,
                                              "width": 16, "height": 12})
    assert [f.name for f in folders] == [f.name for f in reader]
    assert folders[0].intrinsics.fx == 9.0


@pytest.mark.needs_shared
def test_real_tum_frame():
    reader = TumFolder(TUM_SAMPLE)
    assert len(reader) == 1
    frame = reader[0]
    raw = cv2.imread(str(TUM_SAMPLE / "tum_depth.png"), cv2.IMREAD_UNCHANGED)
    assert frame.rgb.shape == (480, 640, 3) and raw.dtype == np.uint16
    np.testing.assert_allclose(frame.depth, raw / 5000.0, rtol=1e-6)
    valid = frame.depth > 0
    assert 0.6 < valid.mean() < 1.0
    assert 0.3 < np.median(frame.depth[valid]) < 5.0   # an office desk, in metres
    assert frame.intrinsics == Intrinsics(525.0, 525.0, 319.5, 239.5, 640, 480)


def test_nyu_mat_undoes_matlab_transposition(tmp_path):
    n, h, w = 3, 12, 16
    rgb = np.stack([_rgb(h, w, seed=i) for i in range(n)])
    depth = np.random.default_rng(5).uniform(0.5, 9.0, (n, h, w)).astype(np.float32)
    labels = np.random.default_rng(6).integers(0, 894, (n, h, w)).astype(np.uint16)
    path = tmp_path / "nyu_depth_v2_labeled.mat"
    with h5py.File(path, "w") as f:   # MATLAB v7.3 column-major layout, as in the real file
        f["images"] = rgb.transpose(0, 3, 2, 1)          # (N, 3, W, H)
        f["depths"] = depth.transpose(0, 2, 1)           # (N, W, H)
        f["labels"] = labels.transpose(0, 2, 1)
    reader = build_reader("nyu_mat", path, indices=[2, 0])
    assert len(reader) == 2
    frame = reader[0]
    np.testing.assert_array_equal(frame.rgb, rgb[2])
    np.testing.assert_array_equal(frame.depth, depth[2])
    np.testing.assert_array_equal(frame.semantic, labels[2])
    assert frame.intrinsics.fx == pytest.approx(518.8579 * w / 640)
    np.testing.assert_array_equal(NyuMat(path)[0].rgb, rgb[0])
    with pytest.raises(ValueError, match=r"indices \[3\] out of range for 3"):
        NyuMat(path, indices=[3])
    with h5py.File(tmp_path / "bad.mat", "w") as f:
        f["images"] = rgb.transpose(0, 3, 2, 1)
    with pytest.raises(ValueError, match="lacks dataset.*depths"):
        NyuMat(tmp_path / "bad.mat")


def test_nyu_png_folder_millimetres(tmp_path):
    _save_rgb(tmp_path / "kitchen" / "rgb_00002.png", _rgb(seed=2))
    _save_u16(tmp_path / "kitchen" / "sync_depth_00002.png", _depth_raw(seed=3))
    _save_rgb(tmp_path / "bath" / "rgb_00010.png", _rgb(seed=4))
    _save_u16(tmp_path / "bath" / "depth_00010.png", _depth_raw(seed=5))
    reader = build_reader("nyu_png", tmp_path)
    assert [f.name for f in reader] == ["bath/rgb_00010", "kitchen/rgb_00002"]
    np.testing.assert_allclose(reader[1].depth, _depth_raw(seed=3) / 1000.0, rtol=1e-6)
    np.testing.assert_array_equal(reader[1].rgb, _rgb(seed=2))
    _save_rgb(tmp_path / "bath" / "rgb_00011.png", _rgb())
    with pytest.raises(FileNotFoundError, match="no depth for .*rgb_00011"):
        NyuPngFolder(tmp_path)


def test_kitti_depth_selection_layout(tmp_path):
    stem = "2011_09_26_drive_0002_sync_{}_0000000005_image_02.png"
    _save_u16(tmp_path / "groundtruth_depth" / stem.format("groundtruth_depth"), _depth_raw())
    _save_rgb(tmp_path / "image" / stem.format("image"), _rgb(seed=7))
    (tmp_path / "intrinsics").mkdir()
    (tmp_path / "intrinsics" / stem.format("image").replace(".png", ".txt")).write_text(
        "721.5377 0.0 609.5593 0.0 721.5377 172.854 0.0 0.0 1.0")
    frame = build_reader("kitti", tmp_path)[0]
    np.testing.assert_allclose(frame.depth, _depth_raw() / 256.0, rtol=1e-6)
    assert frame.depth[0, 0] == 0.0
    np.testing.assert_array_equal(frame.rgb, _rgb(seed=7))
    assert frame.intrinsics == Intrinsics(721.5377, 721.5377, 609.5593, 172.854, 16, 12)


def test_kitti_drive_layout_with_raw_images_and_calib(tmp_path):
    drive = "2011_09_26_drive_0001_sync"
    gt = tmp_path / "train" / drive / "proj_depth" / "groundtruth" / "image_02"
    raw = tmp_path / "raw" / "2011_09_26"
    for i in (5, 6):
        _save_u16(gt / f"{i:010d}.png", _depth_raw(seed=i))
        _save_rgb(raw / drive / "image_02" / "data" / f"{i:010d}.png", _rgb(seed=i))
    (raw / "calib_cam_to_cam.txt").write_text(
        "calib_time: 09-Jan-2012 13:57:47\n"
        "P_rect_02: 7.215377e+02 0.000000e+00 6.095593e+02 4.485728e+01 0.000000e+00 "
        "7.215377e+02 1.728540e+02 2.163791e-01 0.000000e+00 0.000000e+00 1.000000e+00 "
        "2.745884e-03\n")
    reader = KittiDepth(tmp_path / "train", image_root=tmp_path / "raw")
    assert len(reader) == 2
    np.testing.assert_array_equal(reader[1].rgb, _rgb(seed=6))
    np.testing.assert_allclose(reader[1].depth, _depth_raw(seed=6) / 256.0, rtol=1e-6)
    assert reader[0].intrinsics.fx == pytest.approx(721.5377)
    assert reader[0].intrinsics.cy == pytest.approx(172.854)


def _write_bag(path: Path, storage: str, images: list[np.ndarray]) -> None:
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    T = ts.types
    Image, Compressed, Info = (T["sensor_msgs/msg/Image"], T["sensor_msgs/msg/CompressedImage"],
                               T["sensor_msgs/msg/CameraInfo"])
    Header, Time = T["std_msgs/msg/Header"], T["builtin_interfaces/msg/Time"]
    roi = T["sensor_msgs/msg/RegionOfInterest"](0, 0, 0, 0, False)
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    h, w = images[0].shape[:2]
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        raw = writer.add_connection("/cam/image_raw", Image.__msgtype__, typestore=ts)
        comp = writer.add_connection("/cam/image_raw/compressed", Compressed.__msgtype__,
                                     typestore=ts)
        info = writer.add_connection("/cam/camera_info", Info.__msgtype__, typestore=ts)
        header = Header(stamp=Time(sec=1, nanosec=0), frame_id="cam")
        k = np.array([20.0, 0, 7.5, 0, 21.0, 5.5, 0, 0, 1])
        msg = Info(header, h, w, "plumb_bob", np.zeros(5), k, np.eye(3).ravel(),
                   np.zeros(12), 0, 0, roi)
        writer.write(info, 1, ts.serialize_cdr(msg, Info.__msgtype__))
        encodings = {"rgb8": lambda x: x, "bgr8": lambda x: x[..., ::-1],
                     "rgba8": lambda x: np.dstack([x, np.full((h, w), 255, np.uint8)]),
                     "bgra8": lambda x: np.dstack([x[..., ::-1], np.zeros((h, w), np.uint8)]),
                     "mono8": lambda x: x[..., 1]}
        for i, (enc, convert) in enumerate(encodings.items()):
            pixels = np.ascontiguousarray(convert(images[i]))
            ch = 1 if pixels.ndim == 2 else pixels.shape[2]
            step = w * ch + 4   # padded rows, as some drivers send
            data = np.zeros((h, step), np.uint8)
            data[:, : w * ch] = pixels.reshape(h, -1)
            msg = Image(header, h, w, enc, 0, step, data.ravel())
            writer.write(raw, 100 + i, ts.serialize_cdr(msg, Image.__msgtype__))
        for i, fmt in enumerate(["png", "jpeg"]):
            ok, buf = cv2.imencode(f".{fmt[:3]}", cv2.cvtColor(images[i], cv2.COLOR_RGB2BGR))
            msg = Compressed(header, fmt, buf.ravel())
            writer.write(comp, 200 + i, ts.serialize_cdr(msg, Compressed.__msgtype__))


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_rosbag_raw_and_compressed_images(tmp_path, storage):
    images = [_rgb(seed=i) for i in range(5)]
    bag = tmp_path / f"bag_{storage}"
    _write_bag(bag, storage, images)
    reader = build_reader("rosbag", bag, topic="/cam/image_raw")
    assert len(reader) == 5 and [f.name for f in reader] == [str(100 + i) for i in range(5)]
    for i in range(4):   # rgb8, bgr8, rgba8, bgra8: pixel exact
        np.testing.assert_array_equal(reader[i].rgb, images[i])
    np.testing.assert_array_equal(reader[4].rgb, np.repeat(images[4][..., 1:2], 3, axis=2))
    assert reader[0].intrinsics == Intrinsics(20.0, 21.0, 7.5, 5.5, 16, 12)
    compressed = RosbagImages(bag, "/cam/image_raw/compressed")
    np.testing.assert_array_equal(compressed[0].rgb, images[0])   # png is lossless
    assert compressed[1].rgb.shape == (12, 16, 3)                  # jpeg decodes
    with pytest.raises(ValueError, match=r"'/cam/depth' not in .*/cam/image_raw, "
                                         r"/cam/image_raw/compressed"):
        RosbagImages(bag, "/cam/depth")
    with pytest.raises(ValueError, match="image topic None"):
        RosbagImages(bag)


FOLDER_READERS = ["sim", "images", "tum", "nyu_png", "kitti"]


@pytest.mark.parametrize("kind", FOLDER_READERS + ["nyu_mat", "rosbag"])
def test_missing_input_names_the_path(tmp_path, kind):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        build_reader(kind, tmp_path / "does_not_exist")


@pytest.mark.parametrize("kind", ["images", "tum", "nyu_png"])
def test_empty_folder_names_the_folder(tmp_path, kind):
    with pytest.raises(ValueError, match=f"no frames found in {tmp_path}"):
        build_reader(kind, tmp_path)


def test_empty_sim_folder(tmp_path):
    (tmp_path / "rgb").mkdir()
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(ValueError, match=f"no frames found in {tmp_path / 'rgb'}"):
        SimFolder(tmp_path)


def test_mismatched_depth_size_names_both_sizes(tmp_path):
    _save_rgb(tmp_path / "a_color.png", _rgb(12, 16))
    _save_u16(tmp_path / "a_depth.png", _depth_raw(6, 8))
    reader = TumFolder(tmp_path)
    with pytest.raises(ValueError, match="depth size 8x6 does not match image size 16x12"):
        reader[0]
    with pytest.raises(ValueError, match="intrinsics size 8x6 does not match image size 16x12"):
        Frame(rgb=_rgb(12, 16), intrinsics=Intrinsics(5, 5, 3.5, 2.5, 8, 6))
