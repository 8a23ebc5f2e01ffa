"""The ROS-free per-frame pipeline: real ONNX models (FastDepth and tiny hand-made ones)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from depthkd_core.runtime import OnnxDepthModel
from depthkd_core.geometry import Intrinsics
from depthkd_core.imaging import resize_rgb
from depthkd_core.inference import (DepthEstimator, EstimatorConfig, build_point_cloud,
                                    decimated_intrinsics, sample_at_sparse)
from helpers import FASTDEPTH, TUM, write_bright_nan_onnx, write_linear_onnx


@pytest.fixture(scope="module")
def ramp_model(tmp_path_factory: pytest.TempPathFactory) -> OnnxDepthModel:
    """depth = 1 + 4 * red (red in [0, 1]), dynamic input size."""
    path = write_linear_onnx(tmp_path_factory.mktemp("onnx") / "ramp.onnx", 4.0, 1.0)
    return OnnxDepthModel(path, providers="cpu")


def _frame(height: int, width: int, seed: int = 0, block: int = 1) -> np.ndarray:
    """Random RGB made of block x block squares (so an integer downscale is exact)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // block, width // block, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, block, axis=0), block, axis=1)


def _K(height: int, width: int) -> Intrinsics:
    return Intrinsics(fx=50.0, fy=55.0, cx=(width - 1) / 2, cy=(height - 1) / 2,
                      width=width, height=height)


def test_linear_model_exact_and_clipped(ramp_model: OnnxDepthModel) -> None:
    rgb = _frame(8, 12)
    config = EstimatorConfig(min_depth=1.5, max_depth=4.0, input_size=(8, 12))
    result = DepthEstimator(ramp_model, config).estimate(rgb, _K(8, 12))
    expected = 1.0 + 4.0 * rgb[..., 0].astype(np.float32) / 255.0
    expected[(expected < 1.5) | (expected > 4.0)] = np.nan
    assert result.depth.dtype == np.float32 and result.depth.shape == (8, 12)
    np.testing.assert_allclose(result.depth, expected, rtol=1e-6)
    assert np.isnan(result.depth).sum() == np.isnan(expected).sum() > 0
    assert result.intrinsics == _K(8, 12)
    assert set(result.timings) == {"preprocess", "inference", "postprocess"}
    assert all(t >= 0 for t in result.timings.values())


def test_aspect_change_and_model_resolution(ramp_model: OnnxDepthModel) -> None:
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[..., 0] = 102  # red 0.4 -> depth 2.6 everywhere, whatever the resize does
    K = _K(48, 64)
    model_res = DepthEstimator(ramp_model, EstimatorConfig(output_resolution="model",
                                                           input_size=(32, 32)))
    result = model_res.estimate(rgb, K)
    assert result.depth.shape == (32, 32)
    # cv2.resize's pixel-centre mapping: cx' = (cx + 0.5) * sx - 0.5.
    assert result.intrinsics == Intrinsics(50.0 * 0.5, 55.0 * 32 / 48, (31.5 + 0.5) * 0.5 - 0.5,
                                           (23.5 + 0.5) * 32 / 48 - 0.5, 32, 32)
    np.testing.assert_allclose(result.depth, 2.6, rtol=1e-5)
    camera = DepthEstimator(ramp_model, EstimatorConfig(input_size=(32, 32))).estimate(rgb, K)
    assert camera.depth.shape == (48, 64) and camera.intrinsics == K
    np.testing.assert_allclose(camera.depth, 2.6, rtol=1e-5)


def test_model_grid_beside_camera_depth(ramp_model: OnnxDepthModel) -> None:
    """The cloud's default grid: the network's depth with the camera depth's scale and range."""
    rgb, K = _frame(48, 64, seed=3, block=2), _K(48, 64)
    common = {"input_size": (24, 32), "alignment": "scale", "depth_scale": 1.5,
              "min_depth": 2.0, "max_depth": 6.0}
    camera = DepthEstimator(ramp_model, EstimatorConfig(**common)).estimate(rgb, K)
    model = DepthEstimator(ramp_model, EstimatorConfig(output_resolution="model", **common)
                           ).estimate(rgb, K)
    assert camera.depth.shape == (48, 64) and camera.intrinsics == K
    assert camera.model_depth.shape == (24, 32)
    np.testing.assert_array_equal(camera.model_depth, model.depth)  # NaN where invalid too
    assert camera.model_intrinsics == model.intrinsics == K.scaled(32, 24)
    assert np.isnan(camera.model_depth).any() and np.isfinite(camera.model_depth).any()
    valid = camera.model_depth[np.isfinite(camera.model_depth)]
    assert valid.min() >= 2.0 and valid.max() <= 6.0
    assert camera.cloud_grid("model") == (camera.model_depth, camera.model_intrinsics)
    assert camera.cloud_grid("camera") == (camera.depth, camera.intrinsics)
    # At model resolution both grids are the one published.
    assert model.model_depth is model.depth and model.cloud_grid("camera")[1] == model.intrinsics
    with pytest.raises(ValueError, match="cloud resolution must be one of"):
        camera.cloud_grid("full")
    # The cloud's colours on the model grid are the network's own input, not a second resize.
    assert camera.network_rgb.shape == (24, 32, 3)
    np.testing.assert_array_equal(camera.network_rgb, resize_rgb(rgb, 24, 32))
    assert camera.cloud_colors("model", rgb) is camera.network_rgb
    assert camera.cloud_colors("camera", rgb) is rgb


def test_network_size(ramp_model: OnnxDepthModel, tmp_path: Path) -> None:
    # Dynamic model: the frame rounded to the encoder stride 32, like OnnxDepthModel.predict.
    assert DepthEstimator(ramp_model).network_size(50, 70) == (64, 64)
    assert DepthEstimator(ramp_model).network_size(10, 100) == (32, 96)
    fixed = OnnxDepthModel(write_linear_onnx(tmp_path / "f.onnx", 1.0, 1.0, size=(16, 24)), "cpu")
    assert DepthEstimator(fixed).network_size(480, 640) == (16, 24)
    assert DepthEstimator(fixed, EstimatorConfig(input_size=(16, 24))).input_size == (16, 24)
    with pytest.raises(ValueError, match="fixed 16x24"):
        DepthEstimator(fixed, EstimatorConfig(input_size=(32, 32)))


def test_fixed_scale_alignment(ramp_model: OnnxDepthModel) -> None:
    rgb = _frame(8, 12, seed=3)
    config = EstimatorConfig(alignment="scale", depth_scale=2.0, min_depth=0.0, max_depth=100.0,
                             input_size=(8, 12))
    result = DepthEstimator(ramp_model, config).estimate(rgb, _K(8, 12))
    np.testing.assert_allclose(result.depth, 2.0 * (1.0 + 4.0 * rgb[..., 0] / 255.0), rtol=1e-5)
    assert (result.scale, result.shift) == (2.0, 0.0)


@pytest.mark.parametrize("mode, scale, shift", [("lsq", 2.0, 0.5), ("median", 3.0, 0.0)])
def test_sparse_alignment_recovers_scale(ramp_model: OnnxDepthModel, mode: str, scale: float,
                                         shift: float) -> None:
    rgb = _frame(32, 48, seed=1, block=2)
    pred = 1.0 + 4.0 * rgb[..., 0].astype(np.float64) / 255.0
    sparse = np.zeros((32, 48), np.float32)  # 0 = no return, like a projected LiDAR scan
    rng = np.random.default_rng(2)
    ys, xs = rng.integers(0, 32, 40), rng.integers(0, 48, 40)
    sparse[ys, xs] = scale * pred[ys, xs] + shift
    sparse[0, 0] = np.nan
    config = EstimatorConfig(alignment=mode, min_depth=0.0, max_depth=100.0,
                             output_resolution="model", input_size=(16, 24))
    # The network sees a 2x-downscaled frame; the blocks make that downscale exact.
    result = DepthEstimator(ramp_model, config).estimate(rgb, _K(32, 48), sparse)
    assert result.depth.shape == (16, 24)
    np.testing.assert_allclose(result.depth, scale * pred[::2, ::2] + shift, rtol=1e-4)
    assert result.scale == pytest.approx(scale, rel=1e-4)
    assert result.shift == pytest.approx(shift, abs=1e-3)


def test_sparse_alignment_errors(ramp_model: OnnxDepthModel) -> None:
    rgb = _frame(8, 12)
    estimator = DepthEstimator(ramp_model, EstimatorConfig(alignment="lsq", input_size=(8, 12)))
    with pytest.raises(ValueError, match="needs sparse metric depth"):
        estimator.estimate(rgb, _K(8, 12))
    sparse = np.full((8, 12), np.nan, np.float32)
    sparse[:2, :3] = 2.0
    with pytest.raises(ValueError, match="sparse depth has 6 valid points.*at least 20"):
        estimator.estimate(rgb, _K(8, 12), sparse)


def test_sample_at_sparse_maps_pixel_centres() -> None:
    depth = np.arange(6, dtype=np.float32).reshape(2, 3)
    sparse = np.zeros((4, 6), np.float32)
    sparse[3, 5], sparse[1, 2], sparse[2, 0] = 7.0, 8.0, 9.0
    pred, ref = sample_at_sparse(depth, sparse)
    # (1,2)->(0,1)=1; (2,0)->(1,0)=3; (3,5)->(1,2)=5, in row-major order of the sparse pixels.
    np.testing.assert_array_equal(pred, [1.0, 3.0, 5.0])
    np.testing.assert_array_equal(ref, [8.0, 9.0, 7.0])


@pytest.mark.parametrize("offset", [float("nan"), float("inf")])
def test_non_finite_model_output_is_rejected(tmp_path: Path, offset: float) -> None:
    model = OnnxDepthModel(write_linear_onnx(tmp_path / "bad.onnx", 0.0, offset), "cpu")
    estimator = DepthEstimator(model, EstimatorConfig(input_size=(8, 12)))
    with pytest.raises(ValueError, match="96 non-finite"):
        estimator.estimate(_frame(8, 12), _K(8, 12))
    with pytest.raises(ValueError, match="not finite on real content: 96 of 96"):
        estimator.dry_run([_frame(8, 12)])


def test_dry_run_judges_real_content_not_a_black_frame(tmp_path: Path) -> None:
    """A model finite on black frames and NaN where red > 0.5 failed every real frame, but
    passed the old dry run on a black frame."""
    model = OnnxDepthModel(write_bright_nan_onnx(tmp_path / "bright_nan.onnx"), "cpu")
    estimator = DepthEstimator(model, EstimatorConfig())
    black = np.zeros((32, 64, 3), np.uint8)  # the network size: no resize blurs the block
    estimator.dry_run([black])
    bright = black.copy()
    bright[:4, :6, 0] = 200
    with pytest.raises(ValueError, match=r"24 of 2048 values are NaN/inf on frame 2 of 2 "
                                         r"\(64x32\)"):
        estimator.dry_run([black, bright])
    with pytest.raises(ValueError, match="24 non-finite"):
        estimator.estimate(bright, _K(32, 64))
    with pytest.raises(ValueError, match="at least one frame"):
        estimator.dry_run([])


def test_bad_frames_are_rejected(ramp_model: OnnxDepthModel) -> None:
    estimator = DepthEstimator(ramp_model)
    with pytest.raises(ValueError, match="intrinsics are for 12x8 but the image is 14x8"):
        estimator.estimate(_frame(8, 14), _K(8, 12))
    with pytest.raises(ValueError, match="uint8 RGB"):
        estimator.estimate(np.zeros((8, 12), np.uint8), _K(8, 12))


@pytest.mark.parametrize("kwargs, match", [
    ({"output_resolution": "native"}, "output_resolution"),
    ({"alignment": "icp"}, "alignment"),
    ({"depth_scale": 0.0}, "depth_scale"),
    ({"min_depth": 5.0, "max_depth": 1.0}, "min_depth < max_depth"),
    ({"input_size": (0, 32)}, "input_size"),
    ({"min_sparse_points": 1}, "min_sparse_points"),
])
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EstimatorConfig(**kwargs)


def test_point_cloud_by_hand_and_decimation() -> None:
    depth = np.full((4, 6), 2.0, np.float32)
    depth[0, 1] = np.nan
    K = Intrinsics(fx=2.0, fy=4.0, cx=2.5, cy=1.5, width=6, height=4)
    points, colors = build_point_cloud(depth, K)
    assert points.shape == (4, 6, 3) and colors is None
    np.testing.assert_allclose(points[3, 5], [(5 - 2.5) * 2 / 2, (3 - 1.5) * 2 / 4, 2.0])
    assert np.isnan(points[0, 1]).all()
    rgb = _frame(4, 6)
    dec, dec_rgb = build_point_cloud(depth, K, decimation=2, rgb=rgb)
    assert dec.shape == (2, 3, 3)
    np.testing.assert_allclose(dec[1, 2], [(4 - 2.5) * 2 / 2, (2 - 1.5) * 2 / 4, 2.0])
    np.testing.assert_array_equal(dec_rgb, rgb[::2, ::2])
    # Decimation = slicing the full cloud, for sizes not divisible by N too.
    odd = np.random.default_rng(0).uniform(0.5, 5.0, (7, 10)).astype(np.float32)
    K_odd = _K(7, 10)
    assert decimated_intrinsics(K_odd, 3).width == 4 and decimated_intrinsics(K_odd, 3).height == 3
    np.testing.assert_allclose(build_point_cloud(odd, K_odd, 3)[0],
                               build_point_cloud(odd, K_odd)[0][::3, ::3], rtol=1e-6)
    clipped, _ = build_point_cloud(odd, K_odd, min_depth=1.0, max_depth=4.0)
    assert np.array_equal(np.isnan(clipped[..., 2]), (odd < 1.0) | (odd > 4.0))
    # An RGB frame at the camera size is resized to a model-size depth grid.
    _, small_rgb = build_point_cloud(depth, K, rgb=cv2.resize(rgb, (12, 8)))
    assert small_rgb.shape == (4, 6, 3)


@pytest.mark.needs_shared
def test_fastdepth_on_real_tum_frame() -> None:
    bgr = cv2.imread(str(TUM / "tum_color.png"), cv2.IMREAD_COLOR)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    gt = cv2.imread(str(TUM / "tum_depth.png"), cv2.IMREAD_UNCHANGED).astype(np.float32) / 5000
    K = Intrinsics(525.0, 525.0, 319.5, 239.5, 640, 480)
    model = OnnxDepthModel(FASTDEPTH, providers="cpu")
    estimator = DepthEstimator(model, EstimatorConfig(min_depth=0.1, max_depth=10.0))
    estimator.dry_run([rgb])
    result = estimator.estimate(rgb, K)
    assert result.depth.shape == (480, 640) and result.intrinsics == K
    valid = np.isfinite(result.depth) & (gt > 0)
    assert valid.mean() > 0.5
    # A metric indoor model: within a factor of two of the Kinect depth on a desk scene.
    ratio = float(np.median(result.depth[valid] / gt[valid]))
    assert 0.5 < ratio < 2.0, ratio
    small = DepthEstimator(model, EstimatorConfig(output_resolution="model")).estimate(rgb, K)
    assert small.depth.shape == (224, 224) and small.intrinsics == K.scaled(224, 224)
    upsampled = cv2.resize(small.depth, (640, 480), interpolation=cv2.INTER_LINEAR)
    both = np.isfinite(upsampled) & np.isfinite(result.depth)
    np.testing.assert_allclose(upsampled[both], result.depth[both], rtol=1e-4, atol=1e-4)


def test_resize_rgb_shrinks_by_area_in_two_steps_when_it_can() -> None:
    """A shrink by two or more on both sides averages by the largest whole factor first
    (OpenCV's fast path), then by the rest; within a grey level or two of one area step on
    a real-looking frame, identical where one step is already whole, bilinear to grow."""
    import cv2

    from depthkd_core.data import render_frame
    from depthkd_core.imaging import resize_rgb

    rgb = cv2.resize(render_frame("target", 3, 240, 320).rgb, (640, 480), interpolation=cv2.INTER_LINEAR)
    two_step = resize_rgb(rgb, 192, 192)
    one_step = cv2.resize(rgb, (192, 192), interpolation=cv2.INTER_AREA)
    assert two_step.shape == (192, 192, 3) and two_step.dtype == np.uint8
    diff = np.abs(two_step.astype(int) - one_step.astype(int))
    assert 0 < diff.mean() < 1.0 and np.percentile(diff, 99) <= 6
    assert np.array_equal(resize_rgb(rgb, 160, 160), cv2.resize(rgb, (160, 160), interpolation=cv2.INTER_AREA))
    assert np.array_equal(resize_rgb(rgb, 960, 1280), cv2.resize(rgb, (1280, 960), interpolation=cv2.INTER_LINEAR))
    assert resize_rgb(rgb, 480, 640) is rgb
