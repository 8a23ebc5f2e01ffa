"""geometry: intrinsics, back-projection, alignment and colouring against hand values."""

from __future__ import annotations

import numpy as np
import pytest

from depthkd_core.geometry import (TURBO_LUT, Intrinsics, IntrinsicsBounds, align_depth,
                                   backproject_depth, colorize_depth, fit_median_scale,
                                   fit_scale_shift)

NAN = np.nan


# ---------------------------------------------------------------- intrinsics
@pytest.mark.parametrize("kwargs, name", [
    (dict(fx=0.0), "fx"), (dict(fy=-3.0), "fy"), (dict(cx=np.nan), "cx"),
    (dict(cy=np.inf), "cy"), (dict(width=0), "width"), (dict(height=2.5), "height"),
])
def test_intrinsics_rejects_bad_values(kwargs, name):
    good = dict(fx=100.0, fy=80.0, cx=31.5, cy=23.5, width=64, height=48)
    with pytest.raises(ValueError, match=name):
        Intrinsics(**{**good, **kwargs})


@pytest.mark.parametrize("changes, match", [
    (dict(fx=1e-30, fy=1e-30), "fx=1e-30 is 1.56e-32 image widths"),
    (dict(fy=4.7), "fy=4.7 is 0.0979 image heights"),
    (dict(fx=6401.0), "fx=6401 is 100 image widths"),
    (dict(cx=1e38), "cx=1e\\+38 is 1.56e\\+36 image widths"),
    (dict(cy=-1e38), "cy=-1e\\+38"),
    (dict(cx=31.5 + 64.5), "cx=96 is 1.01 image widths"),
])
def test_implausible_intrinsics_are_refused(changes, match):
    good = dict(fx=60.0, fy=62.0, cx=31.5, cy=23.5, width=64, height=48)
    bounds = IntrinsicsBounds()
    bounds.check(Intrinsics(**good))
    # The edges of the defaults pass: 157 deg and 0.6 deg fields of view, a principal
    # point half an image outside the image.
    bounds.check(Intrinsics(**{**good, "fx": 6.4, "fy": 4800.0, "cx": 31.5 + 64.0}))
    with pytest.raises(ValueError, match=match):
        bounds.check(Intrinsics(**{**good, **changes}))


def test_intrinsics_bounds_validate_themselves():
    for kwargs in (dict(min_focal=0.0), dict(min_focal=5.0, max_focal=1.0),
                   dict(max_focal=np.inf), dict(principal_margin=-1.0)):
        with pytest.raises(ValueError):
            IntrinsicsBounds(**kwargs)


def test_scaled_and_cropped_hand_values():
    K = Intrinsics(fx=100.0, fy=80.0, cx=31.5, cy=23.5, width=64, height=48)
    half = K.scaled(32, 24)
    # Pixel-centre convention: the image centre (31.5, 23.5) maps to (15.5, 11.5).
    assert (half.fx, half.fy, half.cx, half.cy, half.width, half.height) == (50.0, 40.0, 15.5, 11.5, 32, 24)
    up = K.scaled(96, 96)  # sx = 1.5, sy = 2
    assert up.fx == 150.0 and up.fy == 160.0
    assert up.cx == pytest.approx(32.0 * 1.5 - 0.5) and up.cy == pytest.approx(24.0 * 2 - 0.5)
    crop = K.cropped(10, 5, 20, 10)
    assert (crop.fx, crop.fy, crop.cx, crop.cy, crop.width, crop.height) == (100.0, 80.0, 21.5, 18.5, 20, 10)
    with pytest.raises(ValueError, match="inside"):
        K.cropped(50, 0, 20, 10)
    with pytest.raises(ValueError, match="inside"):
        K.cropped(-1, 0, 10, 10)


def test_matrix_round_trip_and_camera_info_k():
    K = Intrinsics(fx=525.0, fy=520.0, cx=319.5, cy=239.5, width=640, height=480)
    M = K.matrix()
    assert M.dtype == np.float64
    np.testing.assert_array_equal(M, [[525, 0, 319.5], [0, 520, 239.5], [0, 0, 1]])
    assert Intrinsics.from_matrix(M, 640, 480) == K
    assert Intrinsics.from_matrix(M.ravel().tolist(), 640, 480) == K  # CameraInfo.k layout
    assert K.as_tuple() == (525.0, 520.0, 319.5, 239.5)
    with pytest.raises(ValueError, match="all zeros"):
        Intrinsics.from_matrix([0.0] * 9, 640, 480)
    with pytest.raises(ValueError, match="9 entries"):
        Intrinsics.from_matrix(np.eye(2), 640, 480)


# ------------------------------------------------------------ back-projection
K_SMALL = Intrinsics(fx=2.0, fy=4.0, cx=1.0, cy=0.5, width=3, height=2)


def test_backproject_hand_computed_points():
    depth = np.array([[1.0, 2.0, NAN], [0.0, -1.0, 4.0]], dtype=np.float32)
    pts = backproject_depth(depth, K_SMALL)
    assert pts.shape == (2, 3, 3) and pts.dtype == np.float32
    expected = np.array([[[-0.5, -0.125, 1.0], [0.0, -0.25, 2.0], [NAN, NAN, NAN]],
                         [[NAN, NAN, NAN], [NAN, NAN, NAN], [2.0, 0.5, 4.0]]], dtype=np.float32)
    np.testing.assert_array_equal(pts, expected)  # NaN positions must match too


def test_backproject_min_max_inclusive():
    depth = np.array([[1.0, 2.0, 3.0], [4.0, 2.5, np.inf]], dtype=np.float32)
    pts = backproject_depth(depth, K_SMALL, min_depth=2.0, max_depth=3.0)
    valid = np.isfinite(pts).all(axis=2)
    np.testing.assert_array_equal(valid, [[False, True, True], [False, True, False]])
    assert np.isnan(pts[~valid]).all()
    np.testing.assert_allclose(pts[1, 1], [0.0, 0.3125, 2.5])
    with pytest.raises(ValueError, match="shape"):
        backproject_depth(np.ones((3, 2)), K_SMALL)


def test_backproject_output_is_independent_of_cache():
    depth = np.full((2, 3), 2.0, dtype=np.float32)
    first = backproject_depth(depth, K_SMALL)
    first[:] = 123.0
    np.testing.assert_allclose(backproject_depth(depth, K_SMALL)[0, 0], [-1.0, -0.25, 2.0])


def test_resized_depth_with_scaled_intrinsics_gives_same_rays():
    cv2 = pytest.importorskip("cv2")
    K = Intrinsics(fx=60.0, fy=55.0, cx=30.2, cy=25.7, width=64, height=48)
    full = backproject_depth(np.full((48, 64), 2.0, np.float32), K)
    # A plane at constant depth has X, Y linear in (u, v), so bilinear resizing is exact
    # exactly when the scaled intrinsics follow cv2's pixel-centre mapping.
    resized = np.stack([cv2.resize(full[..., i], (40, 30), interpolation=cv2.INTER_LINEAR)
                        for i in range(3)], axis=-1)
    small = backproject_depth(np.full((30, 40), 2.0, np.float32), K.scaled(40, 30))
    np.testing.assert_allclose(small, resized, atol=1e-5)


# ----------------------------------------------------------------- alignment
def test_lsq_recovers_scale_and_shift_exactly():
    rng = np.random.default_rng(0)
    pred = rng.uniform(0.1, 1.0, (24, 32))
    s, t = fit_scale_shift(pred, 2.5 * pred + 0.7)
    assert s == pytest.approx(2.5, rel=1e-12) and t == pytest.approx(0.7, rel=1e-12)
    np.testing.assert_allclose(align_depth(pred, 2.5 * pred + 0.7, "lsq"), 2.5 * pred + 0.7, rtol=1e-6)


def test_lsq_sparse_reference_and_noise_match_polyfit():
    rng = np.random.default_rng(1)
    pred = rng.uniform(0.1, 1.0, (48, 64))
    sparse = np.zeros_like(pred)  # projected-LiDAR style: 0 where no return
    idx = rng.choice(pred.size, 40, replace=False)
    sparse.flat[idx] = 3.0 * pred.flat[idx] - 0.2 + rng.normal(0.0, 0.01, 40)
    s, t = fit_scale_shift(pred, sparse)
    s_ref, t_ref = np.polyfit(pred.flat[idx], sparse.flat[idx], 1)
    assert s == pytest.approx(s_ref, rel=1e-9) and t == pytest.approx(t_ref, abs=1e-9)
    assert s == pytest.approx(3.0, abs=0.05) and t == pytest.approx(-0.2, abs=0.05)
    mask = np.zeros(pred.shape, bool)
    mask.flat[idx[:2]] = True  # two points determine the line exactly
    s2, t2 = fit_scale_shift(pred, sparse, mask)
    assert s2 * pred.flat[idx[0]] + t2 == pytest.approx(sparse.flat[idx[0]])
    assert s2 * pred.flat[idx[1]] + t2 == pytest.approx(sparse.flat[idx[1]])


def test_alignment_errors():
    pred = np.array([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="at least 2"):
        fit_scale_shift(pred, np.array([0.0, 0.0, 5.0]))
    with pytest.raises(ValueError, match="constant"):
        fit_scale_shift(np.full(3, 2.0), np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="at least 1"):
        fit_median_scale(pred, np.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        fit_scale_shift(pred, np.ones(4))
    with pytest.raises(ValueError, match="unknown alignment"):
        align_depth(pred, pred, "affine")


def test_median_scale_and_modes():
    pred = np.array([1.0, 2.0, 3.0, 100.0, NAN])
    ref = np.array([2.0, 4.0, 9.0, 0.0, 8.0])  # 0 and NaN-pred pixels are excluded
    assert fit_median_scale(pred, ref) == pytest.approx(4.0 / 2.0)
    assert fit_median_scale(pred, ref, mask=np.array([0, 1, 1, 0, 0], bool)) == pytest.approx(6.5 / 2.5)
    np.testing.assert_allclose(align_depth(pred[:3], ref[:3], "median"), [2.0, 4.0, 6.0])
    same = align_depth(pred, ref, "none")
    assert same.dtype == np.float32 and same is not pred
    np.testing.assert_array_equal(same, pred.astype(np.float32))


# ------------------------------------------------------------------ colorize
def test_turbo_lut_endpoints_from_polynomial():
    assert TURBO_LUT.shape == (256, 3) and TURBO_LUT.dtype == np.uint8
    # x = 0: the constant terms; x = 1: the sum of each channel's coefficients, clipped.
    np.testing.assert_array_equal(TURBO_LUT[0], [35, 23, 27])
    np.testing.assert_array_equal(TURBO_LUT[255], [144, 13, 0])


def test_colorize_near_warm_invalid_black():
    depth = np.array([[1.0, 2.0], [NAN, 0.0]], dtype=np.float32)
    rgb = colorize_depth(depth, min_depth=1.0, max_depth=2.0)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, 0], TURBO_LUT[255])  # near -> red end
    np.testing.assert_array_equal(rgb[0, 1], TURBO_LUT[0])
    np.testing.assert_array_equal(rgb[1], 0)
    near, far = colorize_depth(np.array([[1.0, 1.8]]), min_depth=1.0, max_depth=2.0)[0]
    assert near[0] > near[2] and far[2] > far[0]  # warm near, cool far
    ramp = colorize_depth(np.linspace(1.0, 9.0, 200, dtype=np.float32).reshape(10, 20))
    np.testing.assert_array_equal(ramp[0, :3], np.broadcast_to(TURBO_LUT[255], (3, 3)))  # below the 2nd percentile
    flat = colorize_depth(np.full((2, 2), 3.0, np.float32))
    np.testing.assert_array_equal(flat, np.broadcast_to(TURBO_LUT[255], (2, 2, 3)))
    np.testing.assert_array_equal(colorize_depth(np.zeros((2, 2))), 0)
    with pytest.raises(ValueError, match="2-D"):
        colorize_depth(np.ones((2, 2, 1)))
    with pytest.raises(ValueError, match="range"):
        colorize_depth(depth, min_depth=3.0, max_depth=2.0)
