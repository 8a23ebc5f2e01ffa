"""The procedural simulator: determinism, domains, z-depth geometry, labels, files, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from depthkd_core.cli import main as cli_main
from depthkd_core.data import SimFolder, render_frame, render_sequence, write_dataset
from depthkd_core.data.render import render_view
from depthkd_core.data.scene import CameraPose, make_scene
from depthkd_core.data.simulator import STYLES, frame_seed
from depthkd_core.geometry import Intrinsics

REPO = Path(__file__).resolve().parents[1]


def test_same_seed_same_frame_and_different_seed_differs():
    a, b = render_frame("target", 3, 48, 64), render_frame("target", 3, 48, 64)
    for field in ("rgb", "depth", "semantic", "instance"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.intrinsics == b.intrinsics
    c = render_frame("target", 4, 48, 64)
    assert not np.array_equal(a.depth, c.depth)


def test_frame_contract_types():
    f = render_frame("sim", 0, 30, 40)
    assert f.rgb.shape == (30, 40, 3) and f.rgb.dtype == np.uint8
    assert f.depth.shape == (30, 40) and f.depth.dtype == np.float32
    assert f.semantic.shape == f.instance.shape == (30, 40)
    assert (f.intrinsics.width, f.intrinsics.height) == (40, 30)
    assert 0.8 * 40 <= f.intrinsics.fx <= 1.0 * 40 and f.intrinsics.fx == f.intrinsics.fy


def _saturation(rgb: np.ndarray) -> float:
    return float(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1].mean() / 255)


def test_styles_are_different_domains():
    target = [render_frame("target", s, 48, 64) for s in range(6)]
    sim = [render_frame("sim", s, 48, 64) for s in range(6)]
    sat_target = np.mean([_saturation(f.rgb) for f in target])
    sat_sim = np.mean([_saturation(f.rgb) for f in sim])
    assert sat_sim > sat_target + 0.25, (sat_sim, sat_target)
    # the target camera has sensor noise and blur: neighbouring pixels of a flat wall differ
    wall = target[0].semantic == 0
    assert np.abs(np.diff(target[0].rgb.astype(int), axis=1))[wall[:, 1:]].mean() > 0.5


@pytest.mark.parametrize("style", ["target", "sim"])
def test_depth_positive_and_plausible(style):
    for seed in range(8):
        depth = render_frame(style, seed, 36, 48).depth
        assert np.all(np.isfinite(depth))
        assert depth.min() > 0.3 and depth.max() < 15.0, (seed, depth.min(), depth.max())


def _empty_room(size: float = 10.0):
    style = dataclasses.replace(STYLES["target"], n_objects=(0, 0), room_size=(size, size),
                                room_height=(3.0, 3.0))
    return make_scene(style, np.random.default_rng(0)), style


def test_floor_depth_is_z_depth_of_ray_plane_intersection():
    scene, style = _empty_room()
    K = Intrinsics(fx=100, fy=100, cx=31.5, cy=23.5, width=64, height=48)
    pose = CameraPose(position=(5.0, 5.0, 1.5), yaw=0.3, pitch=0.2)
    frame = render_view(scene, pose, K, style, np.random.default_rng(0))
    # Hand-computed: h / (cos(p) * (v - cy) / fy + sin(p)) for v = 47, any column.
    assert frame.semantic[47, 10] == 1
    np.testing.assert_allclose(frame.depth[47], 3.496626, atol=1e-4)
    floor = frame.semantic == 1
    v = np.nonzero(floor)[0]
    expected = 1.5 / (math.cos(0.2) * (v - K.cy) / K.fy + math.sin(0.2))
    np.testing.assert_allclose(frame.depth[floor], expected, rtol=1e-5)
    assert floor.sum() > 500


def test_wall_facing_camera_has_constant_z_depth():
    scene, style = _empty_room()
    K = Intrinsics(fx=40, fy=40, cx=31.5, cy=23.5, width=64, height=48)
    frame = render_view(scene, CameraPose((2.0, 5.0, 1.5), yaw=0.0, pitch=0.0), K, style,
                        np.random.default_rng(0))
    far_wall = frame.instance == 2        # the wall at x = 10 (room parts are 1-based)
    assert far_wall.sum() > 500
    np.testing.assert_allclose(frame.depth[far_wall], 8.0, atol=1e-4)   # not ray length


def test_each_instance_has_one_class():
    seen: set[int] = set()
    for style in ("target", "sim"):
        for seed in range(5):
            f = render_frame(style, seed, 48, 64)
            pairs = np.unique(np.stack([f.instance.ravel(), f.semantic.ravel()]), axis=1)
            assert len(np.unique(pairs[0])) == pairs.shape[1], (style, seed)
            room = f.instance <= 6   # walls 1-4, floor 5, ceiling 6
            np.testing.assert_array_equal(f.semantic[room],
                                          np.array([0, 0, 0, 0, 1, 2])[f.instance[room] - 1])
            seen |= set(np.unique(f.semantic).tolist())
    assert seen <= set(range(9)) and {0, 1, 2} <= seen and len(seen & set(range(3, 9))) >= 3


def test_sequence_moves_smoothly_in_one_room():
    frames = render_sequence("target", 5, 20, 32, 40)
    assert len(frames) == 20 and len({f.intrinsics for f in frames}) == 1
    steps = [np.abs(a.depth - b.depth).mean() for a, b in zip(frames, frames[1:])]
    others = [np.abs(f.depth - render_frame("target", s, 32, 40).depth).mean()
              for s, f in zip(range(5), frames[::4])]
    assert max(steps) < 0.15 * frames[0].depth.mean(), steps
    assert max(steps) < 0.5 * np.mean(others)
    assert np.abs(frames[0].depth - frames[-1].depth).mean() > max(steps)   # it does move


def test_write_dataset_round_trip(tmp_path):
    out = write_dataset(tmp_path / "ds", "sim", 3, height=48, width=64, seed=7, workers=1)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n"] == 3 and meta["depth_scale"] == 1000.0 and meta["classes"]["3"] == "table"
    assert sorted(p.name for p in (out / "depth").iterdir()) == [f"{i:06d}.png" for i in range(3)]
    assert cv2.imread(str(out / "depth" / "000000.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    reader = SimFolder(out)
    assert len(reader) == 3
    for i, frame in enumerate(reader):
        ref = render_frame("sim", frame_seed(7, i), 48, 64)
        np.testing.assert_array_equal(frame.rgb, ref.rgb)
        assert np.abs(frame.depth - ref.depth).max() <= 0.0005 + 1e-6   # within 1 mm
        np.testing.assert_array_equal(frame.semantic, ref.semantic)
        np.testing.assert_array_equal(frame.instance, ref.instance)
        assert frame.intrinsics == ref.intrinsics


def test_a_joined_style_alternates_its_styles_frame_by_frame(tmp_path):
    out = write_dataset(tmp_path / "mixed", "target+indoor", 4, height=24, width=32, seed=7,
                        workers=1)
    assert json.loads((out / "meta.json").read_text())["style"] == "target+indoor"
    for i, frame in enumerate(SimFolder(out)):
        ref = render_frame(("target", "indoor")[i % 2], frame_seed(7, i), 24, 32)
        np.testing.assert_array_equal(frame.rgb, ref.rgb)
    with pytest.raises(ValueError, match="one style"):
        write_dataset(tmp_path / "clip", "target+indoor", 4, height=24, width=32, sequence=True)
    with pytest.raises(ValueError, match="unknown style"):
        write_dataset(tmp_path / "bad", "target+nope", 4, height=24, width=32)


def test_write_sequence_stores_the_clip(tmp_path):
    out = write_dataset(tmp_path / "clip", "target", 4, height=24, width=32, seed=3,
                        sequence=True)
    assert json.loads((out / "meta.json").read_text())["sequence"] is True
    for frame, ref in zip(SimFolder(out), render_sequence("target", 3, 4, 24, 32)):
        np.testing.assert_array_equal(frame.rgb, ref.rgb)
        assert np.abs(frame.depth - ref.depth).max() <= 0.0005 + 1e-6
        assert frame.intrinsics == ref.intrinsics


def test_write_dataset_parallel_equals_serial_and_constant_intrinsics(tmp_path):
    serial = write_dataset(tmp_path / "a", "target", 8, height=24, width=32, seed=1, workers=1)
    parallel = write_dataset(tmp_path / "b", "target", 8, height=24, width=32, seed=1, workers=2)
    for sub in ("rgb", "depth", "semantic", "instance"):
        for name in ("000000.png", "000007.png"):
            a = cv2.imread(str(serial / sub / name), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(a, cv2.imread(str(parallel / sub / name),
                                                        cv2.IMREAD_UNCHANGED))
    cam = json.loads((parallel / "intrinsics.json").read_text())
    assert cam["fx"] == pytest.approx(0.85 * 32) and cam["width"] == 32   # one camera


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown style 'outdoor'"):
        render_frame("outdoor", 0)
    with pytest.raises(ValueError, match="n >= 1"):
        render_sequence("sim", 0, 0)


def test_cli_simulate_writes_dataset_without_torch(tmp_path):
    assert cli_main(["simulate", "--style", "target", "--n", "2", "--out", str(tmp_path / "c"),
                     "--height", "24", "--width", "32", "--seed", "3"]) == 0
    assert len(SimFolder(tmp_path / "c")) == 2
    code = ("import sys; from depthkd_core.cli import main; "
            f"rc = main(['simulate', '--style', 'sim', '--n', '1', '--out', r'{tmp_path / 'd'}', "
            "'--height', '16', '--width', '16']); "
            "assert rc == 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
