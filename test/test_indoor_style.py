"""The ``indoor`` style: furnished rooms, soft shading and a consumer camera's effects."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from depthkd_core.data import SimFolder, render_frame, render_sequence, write_dataset
from depthkd_core.data.camera_effects import CameraEffects, apply_camera
from depthkd_core.data.render import render_view
from depthkd_core.data.scene import CameraPose, make_scene, sample_intrinsics, sample_pose
from depthkd_core.data.simulator import STYLES, frame_seed
from depthkd_core.data.styles import CLASS_IDS, SceneStyle

H, W = 48, 64


def _image(seed: int = 0) -> np.ndarray:
    """A smooth float test image in [0, 1] with some structure."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    rng = np.random.default_rng(seed)
    base = 0.5 + 0.3 * np.sin(xx / 7)[..., None] * np.cos(yy / 5)[..., None]
    base = base + 0.15 * ((xx // 4 + yy // 4) % 2)[..., None]   # sharp edges
    return np.clip(base * rng.uniform(0.6, 1.0, 3).astype(np.float32), 0, 1)


def test_indoor_renders_plausible_furnished_rooms():
    seen: set[int] = set()
    medians = []
    for seed in range(6):
        f = render_frame("indoor", seed, H, W)
        assert f.rgb.shape == (H, W, 3) and f.rgb.dtype == np.uint8
        assert f.depth.dtype == np.float32 and np.all(np.isfinite(f.depth))
        assert f.depth.min() > 0.2 and f.depth.max() < 12.0, (seed, f.depth.min(), f.depth.max())
        assert 5 < f.rgb.mean() < 250            # auto-exposure: neither black nor white
        medians.append(float(np.median(f.depth)))
        pairs = np.unique(np.stack([f.instance.ravel(), f.semantic.ravel()]), axis=1)
        assert len(np.unique(pairs[0])) == pairs.shape[1], seed   # one class per instance
        seen |= set(np.unique(f.semantic).tolist())
        assert 0.84 * W <= f.intrinsics.fx <= 0.94 * W
    assert 1.0 < np.median(medians) < 5.0, medians
    new = {CLASS_IDS[c] for c in ("chair", "sofa", "object", "door", "window", "picture", "lamp")}
    assert len(seen & new) >= 2, seen


def test_indoor_same_seed_is_byte_identical_and_seeds_differ():
    a, b = render_frame("indoor", 11, H, W), render_frame("indoor", 11, H, W)
    for field in ("rgb", "depth", "semantic", "instance"):
        assert getattr(a, field).tobytes() == getattr(b, field).tobytes(), field
    assert a.intrinsics == b.intrinsics
    assert not np.array_equal(a.rgb, render_frame("indoor", 12, H, W).rgb)
    clip1, clip2 = render_sequence("indoor", 3, 3, 24, 32), render_sequence("indoor", 3, 3, 24, 32)
    for f1, f2 in zip(clip1, clip2):
        assert f1.rgb.tobytes() == f2.rgb.tobytes() and f1.depth.tobytes() == f2.depth.tobytes()


def test_indoor_dataset_round_trip(tmp_path):
    out = write_dataset(tmp_path / "ds", "indoor", 2, height=24, width=32, seed=5, workers=1)
    for i, frame in enumerate(SimFolder(out)):
        ref = render_frame("indoor", frame_seed(5, i), 24, 32)
        np.testing.assert_array_equal(frame.rgb, ref.rgb)
        assert np.abs(frame.depth - ref.depth).max() <= 0.0005 + 1e-6


def test_camera_effects_change_the_image_and_stay_in_range():
    image = _image()
    plain = apply_camera(image, CameraEffects(), np.random.default_rng(0))
    np.testing.assert_array_equal(plain, np.round(image * 255).astype(np.uint8))  # identity
    effects = STYLES["indoor"].effects
    out = apply_camera(image, effects, np.random.default_rng(0))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - plain.astype(int)).mean() > 2
    # over-bright input: the highlight shoulder and clipping keep it in range
    bright = apply_camera(image * 3, dataclasses.replace(effects, auto_exposure=(0.0, 0.0)),
                          np.random.default_rng(0))
    assert bright.min() >= 0 and bright.max() <= 255 and bright.mean() > out.mean() * 0.8


@pytest.mark.parametrize("name, value", [
    ("exposure", (0.5, 0.5)), ("white_balance", (0.1, 0.1)), ("vignetting", (0.4, 0.4)),
    ("blur_sigma", (3.0, 3.0)), ("read_noise", (0.02, 0.02)), ("jpeg_quality", (40, 40)),
    ("gamma", (0.8, 0.8)), ("auto_exposure", (0.2, 0.2)),
])
def test_each_camera_effect_changes_the_image(name, value):
    image = _image(1)
    plain = apply_camera(image, CameraEffects(), np.random.default_rng(3))
    out = apply_camera(image, CameraEffects(**{name: value}), np.random.default_rng(3))
    assert not np.array_equal(out, plain), name


def test_motion_blur_streak():
    image = _image(2)
    fx = CameraEffects(motion_blur=(30.0, 30.0), motion_probability=1.0)   # 6 px at W=64
    out = apply_camera(image, fx, np.random.default_rng(0))
    plain = apply_camera(image, CameraEffects(), np.random.default_rng(0))
    # a streak smooths: less high-frequency energy than the sharp image
    assert np.abs(np.diff(out.astype(int), axis=1)).mean() < np.abs(
        np.diff(plain.astype(int), axis=1)).mean()


def test_effects_are_fixed_by_the_seed_and_differ_between_seeds():
    image, effects = _image(), STYLES["indoor"].effects
    a = apply_camera(image, effects, np.random.default_rng(7))
    assert a.tobytes() == apply_camera(image, effects, np.random.default_rng(7)).tobytes()
    assert not np.array_equal(a, apply_camera(image, effects, np.random.default_rng(8)))
    # the same view (scene, pose, camera) with another frame generator: same depth, other image
    style = STYLES["indoor"]
    rng = np.random.default_rng(4)
    scene = make_scene(style, rng)
    K = sample_intrinsics(style, rng, W, H)
    pose = sample_pose(scene, rng, style=style)
    f1 = render_view(scene, pose, K, style, np.random.default_rng(1))
    f2 = render_view(scene, pose, K, style, np.random.default_rng(2))
    np.testing.assert_array_equal(f1.depth, f2.depth)
    assert not np.array_equal(f1.rgb, f2.rgb)


def test_camera_effects_validation():
    with pytest.raises(ValueError, match="exposure"):
        CameraEffects(exposure=(1.0, 0.0))
    with pytest.raises(ValueError, match="jpeg_quality"):
        CameraEffects(jpeg_quality=(0, 90))
    with pytest.raises(ValueError, match="effects"):
        dataclasses.replace(STYLES["indoor"], noise_std=0.01)


def test_roll_turns_the_image_about_the_optical_axis():
    level = CameraPose((1.0, 1.0, 1.5), yaw=0.4, pitch=0.2)
    rolled = dataclasses.replace(level, roll=math.radians(10))
    R0, R1 = level.rotation(), rolled.rotation()
    np.testing.assert_allclose(R1.T @ R1, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(R1[:, 2], R0[:, 2])                  # same optical axis
    assert math.degrees(math.acos(R0[:, 0] @ R1[:, 0])) == pytest.approx(10)


def test_new_style_fields_default_to_the_old_behaviour():
    fields = {f.name: f for f in dataclasses.fields(SceneStyle)}
    for style in ("target", "sim"):
        s = STYLES[style]
        for name in ("camera_height", "camera_pitch", "camera_roll", "camera_near_wall",
                     "camera_margin",
                     "lights", "occlusion", "shadows", "clutter", "wall_items", "effects",
                     "natural_colours", "gloss", "chairs_at_tables", "furniture_fronts"):
            assert getattr(s, name) == fields[name].default, (style, name)
