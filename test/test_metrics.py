"""evaluate.metrics: each metric against hand-computed values, crops, alignment, batches."""

from __future__ import annotations

import math

import numpy as np
import pytest

from depthkd_core.evaluate.metrics import (METRIC_KEYS, MetricAccumulator, compute_depth_metrics,
                                           eigen_crop_mask, garg_crop_mask)

PRED = np.array([[3.0, 2.0], [3.0, 4.0]])
GT = np.array([[1.0, 2.0], [4.0, 4.0]])


def test_each_metric_by_hand_2x2():
    m = compute_depth_metrics(PRED, GT)
    assert set(m) == set(METRIC_KEYS)
    g = [math.log(3.0), 0.0, math.log(0.75), 0.0]  # ln pred - ln gt
    mean_g2 = sum(v * v for v in g) / 4
    mean_g = sum(g) / 4
    expected = {
        "abs_rel": (2.0 / 1.0 + 1.0 / 4.0) / 4,
        "sq_rel": (4.0 / 1.0 + 1.0 / 4.0) / 4,
        "rmse": math.sqrt((4.0 + 1.0) / 4),
        "rmse_log": math.sqrt(mean_g2),
        "log10": (math.log10(3.0) + abs(math.log10(0.75))) / 4,
        "silog": 100.0 * math.sqrt(mean_g2 - mean_g ** 2),
        "delta1": 2 / 4,  # ratios 3, 1, 4/3, 1
        "delta2": 3 / 4,
        "delta3": 3 / 4,
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, rel=1e-12), key


def test_valid_range_and_clipping_3x3():
    gt = np.array([[1.0, 0.0, np.nan], [20.0, 2.0, 4.0], [np.inf, -1.0, 10.0]])
    pred = np.array([[2.0, 5.0, 5.0], [5.0, 100.0, np.nan], [5.0, 5.0, 10.0]])
    m = compute_depth_metrics(pred, gt, min_depth=0.5, max_depth=10.0)
    # Valid gt: 1, 2, 4, 10 (10 is inside the closed upper end). Predictions after
    # clipping to [0.5, 10] (NaN -> min_depth as in BTS): 2, 10, 0.5, 10.
    abs_rel = (1.0 / 1.0 + 8.0 / 2.0 + 3.5 / 4.0 + 0.0) / 4
    assert m["abs_rel"] == pytest.approx(abs_rel)
    assert m["rmse"] == pytest.approx(math.sqrt((1.0 + 64.0 + 12.25 + 0.0) / 4))
    assert m["delta3"] == pytest.approx(1 / 4)  # only the exact pixel; the ratios are 2, 5, 8


def test_crop_masks_bounds():
    eigen = eigen_crop_mask(480, 640)
    assert eigen.shape == (480, 640) and eigen.sum() == (471 - 45) * (601 - 41)
    assert eigen[45, 41] and eigen[470, 600] and not eigen[44, 41] and not eigen[471, 600]
    assert not eigen[45, 40] and not eigen[45, 601]
    half = eigen_crop_mask(240, 320)
    rows, cols = np.nonzero(half.any(axis=1))[0], np.nonzero(half.any(axis=0))[0]
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (22, 235, 20, 300)
    garg = garg_crop_mask(375, 1242)  # a KITTI frame
    rows, cols = np.nonzero(garg.any(axis=1))[0], np.nonzero(garg.any(axis=0))[0]
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (153, 371, 44, 1197)
    assert garg.sum() == (371 - 153) * (1197 - 44)


def test_crop_excludes_errors_outside():
    gt = np.full((480, 640), 3.0)
    pred = gt.copy()
    pred[:45] = 6.0  # wrong only above the Eigen crop
    assert compute_depth_metrics(pred, gt)["abs_rel"] > 0.05
    assert compute_depth_metrics(pred, gt, crop="eigen")["abs_rel"] == 0.0
    with pytest.raises(ValueError, match="crop"):
        compute_depth_metrics(pred, gt, crop="center")


def test_alignment_modes():
    gt = np.linspace(3.0, 9.0, 16).reshape(4, 4)
    scaled = 0.5 * gt
    assert compute_depth_metrics(scaled, gt)["abs_rel"] == pytest.approx(0.5)
    assert compute_depth_metrics(scaled, gt, alignment="median")["abs_rel"] == pytest.approx(0.0, abs=1e-7)
    affine = 0.5 * gt - 1.0
    assert compute_depth_metrics(affine, gt, alignment="median")["abs_rel"] > 0.01
    m = compute_depth_metrics(affine, gt, alignment="lsq")
    assert m["abs_rel"] == pytest.approx(0.0, abs=1e-6) and m["delta1"] == 1.0
    with pytest.raises(ValueError, match="alignment"):
        compute_depth_metrics(affine, gt, alignment="affine")


def test_inverse_depth_aligned_in_disparity_space():
    gt = np.linspace(2.0, 8.0, 16).reshape(4, 4)
    disparity = 3.0 / gt + 0.1  # relative inverse depth: affine in 1 / gt
    m = compute_depth_metrics(disparity, gt, alignment="lsq", inverse=True)
    assert m["abs_rel"] == pytest.approx(0.0, abs=1e-6) and m["delta1"] == 1.0
    assert compute_depth_metrics(disparity, gt, alignment="lsq")["abs_rel"] > 0.1
    with pytest.raises(ValueError, match="inverse"):
        compute_depth_metrics(disparity, gt, inverse=True)


def test_batch_is_mean_of_images_and_accumulator():
    gt = np.stack([GT, GT])[:, None]  # (2,1,2,2)
    pred = np.stack([GT, 2.0 * GT])[:, None]  # perfect, then twice too far (all < max_depth)
    m = compute_depth_metrics(pred, gt)
    assert m["abs_rel"] == pytest.approx(0.5) and m["delta1"] == pytest.approx(0.5)
    acc = MetricAccumulator()
    acc.update(pred[0], gt[0])  # (1,H,W)
    acc.update(pred[1, 0], gt[1, 0])  # (H,W)
    result = acc.compute()
    assert result["count"] == 2
    for key in METRIC_KEYS:
        assert result[key] == pytest.approx(m[key]), key
    with pytest.raises(ValueError, match="no images"):
        MetricAccumulator().compute()


def test_torch_tensors_accepted():
    torch = pytest.importorskip("torch")
    pred = torch.tensor(PRED, requires_grad=True)[None, None]
    m = compute_depth_metrics(pred, torch.tensor(GT)[None, None])
    assert m["abs_rel"] == pytest.approx(compute_depth_metrics(PRED, GT)["abs_rel"])


def test_bad_inputs():
    with pytest.raises(ValueError, match="does not match"):
        compute_depth_metrics(np.ones((2, 2)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="shape"):
        compute_depth_metrics(np.ones((3, 2, 2)), np.ones((3, 2, 2)))
    with pytest.raises(ValueError, match="no valid"):
        compute_depth_metrics(np.ones((2, 2)), np.full((2, 2), 50.0))
    with pytest.raises(ValueError, match="min_depth"):
        compute_depth_metrics(PRED, GT, min_depth=0.0)
