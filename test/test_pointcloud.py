"""PLY writing and the oblique cloud view used by `depthkd demo`."""

from __future__ import annotations

import numpy as np
import pytest

from depthkd_core.geometry import Intrinsics, backproject_depth
from depthkd_core.geometry.pointcloud import read_ply, render_point_cloud, write_ply


def test_ply_round_trip_skips_invalid_points(tmp_path):
    points = np.array([[[0.0, 0.0, 1.0], [np.nan, np.nan, np.nan]],
                       [[1.5, -2.0, 3.25], [0.1, 0.2, 0.3]]], dtype=np.float32)
    colors = np.array([[[255, 0, 0], [1, 2, 3]], [[0, 255, 0], [7, 8, 9]]], dtype=np.uint8)
    count = write_ply(tmp_path / "c.ply", points, colors)
    assert count == 3
    got_points, got_colors = read_ply(tmp_path / "c.ply")
    np.testing.assert_array_equal(got_points, points.reshape(-1, 3)[[0, 2, 3]])
    np.testing.assert_array_equal(got_colors, colors.reshape(-1, 3)[[0, 2, 3]])
    assert not list(tmp_path.glob(".c.ply.*")), "temporary file left behind"


def test_ply_without_colour_and_mismatched_colours(tmp_path):
    write_ply(tmp_path / "p.ply", np.ones((4, 3), np.float32))
    pts, cols = read_ply(tmp_path / "p.ply")
    assert pts.shape == (4, 3) and cols is None
    with pytest.raises(ValueError, match="colours"):
        write_ply(tmp_path / "q.ply", np.ones((4, 3), np.float32), np.zeros((3, 3), np.uint8))


def test_render_draws_the_nearest_point_on_top():
    # Two points on the same line of sight of the virtual camera (no rotation):
    # the nearer one (green) must win whichever order they are given in.
    points = np.array([[0.0, 0.0, 2.0], [0.0, 0.0, 1.0], [0.5, 0.5, 1.5], [-0.5, -0.5, 1.5]],
                      np.float32)
    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 255]], np.uint8)
    for order in ([0, 1, 2, 3], [1, 0, 3, 2]):
        image = render_point_cloud(points[order], colors[order], 64, 64, yaw_deg=0.0,
                                   pitch_deg=0.0, point_size=1)
        assert tuple(image[31, 31]) == (0, 255, 0) or tuple(image[32, 32]) == (0, 255, 0)
        assert not np.any(np.all(image == (255, 0, 0), axis=-1))


def test_render_of_a_real_backprojection_fills_the_view():
    K = Intrinsics(fx=50.0, fy=50.0, cx=31.5, cy=23.5, width=64, height=48)
    depth = np.full((48, 64), 2.0, np.float32)
    depth[10:20, 10:20] = np.nan
    image = render_point_cloud(backproject_depth(depth, K), None, 80, 60)
    filled = np.any(image > 0, axis=-1).mean()
    assert 0.05 < filled < 0.95
    assert not render_point_cloud(np.full((4, 3), np.nan), None, 8, 8).any()
