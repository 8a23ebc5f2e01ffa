"""DepthDataset: the contract dict, nearest-neighbour depth, intrinsics, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from depthkd_core.data import DepthDataset, Frame, build_reader, write_dataset
from depthkd_core.data.dataset import resize_nearest
from depthkd_core.geometry import Intrinsics
from depthkd_core.train.config import DataConfig

K = Intrinsics(fx=50.0, fy=52.0, cx=30.0, cy=20.0, width=64, height=48)


def _frame(with_labels: bool = True) -> Frame:
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    depth = np.full((48, 64), 1.0, dtype=np.float32)
    depth[:, 32:] = 3.0            # an object edge: no 2.0 may appear after resizing
    depth[:4, :4] = 0.0            # invalid corner
    semantic = np.zeros((48, 64), dtype=np.int32)
    semantic[:, 32:] = 5
    return Frame(rgb=rgb, depth=depth if with_labels else None,
                 intrinsics=K if with_labels else None,
                 semantic=semantic if with_labels else None, name="f")


def test_resize_nearest_uses_pixel_centres():
    np.testing.assert_array_equal(resize_nearest(np.arange(8)[None], 1, 4), [[1, 3, 5, 7]])
    np.testing.assert_array_equal(resize_nearest(np.arange(2)[None], 1, 4), [[0, 0, 1, 1]])


def test_item_matches_contract():
    item = DepthDataset([_frame()], 24, 32)[0]
    assert item["image"].shape == (3, 24, 32) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["depth"].shape == (1, 24, 32) and item["valid"].dtype == torch.bool
    assert set(item["depth"].unique().tolist()) == {0.0, 1.0, 3.0}
    assert torch.equal(item["valid"], item["depth"] > 0)
    assert item["valid"][0, :2, :2].sum() == 0 and item["valid"].sum() == 24 * 32 - 4
    assert item["semantic"].dtype == torch.int64 and item["semantic"][0, 31] == 5
    # 64x48 -> 32x24: fx/2, cx' = (cx + 0.5) / 2 - 0.5
    torch.testing.assert_close(item["intrinsics"], torch.tensor([25.0, 26.0, 14.75, 9.75]))
    assert bool(item["has_depth"])


def test_frame_without_labels():
    item = DepthDataset([_frame(with_labels=False)], 24, 32)[0]
    assert not bool(item["has_depth"])
    assert torch.equal(item["depth"], torch.zeros(1, 24, 32)) and not item["valid"].any()
    assert torch.equal(item["semantic"], torch.full((24, 32), -1))
    assert torch.equal(item["intrinsics"], torch.zeros(4))


def test_augment_is_seeded_and_flip_mirrors_cx():
    ds, plain = DepthDataset([_frame()], 24, 32, augment=True), DepthDataset([_frame()], 24, 32)[0]
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        a = ds[0]
        torch.manual_seed(seed)
        b = ds[0]
        for key in a:
            assert torch.equal(a[key], b[key]), key
        flipped = not torch.equal(a["depth"], plain["depth"])
        flips.add(flipped)
        if flipped:
            assert torch.equal(a["depth"], plain["depth"].flip(-1))
            assert torch.equal(a["semantic"], plain["semantic"].flip(-1))
            assert a["intrinsics"][2] == pytest.approx(31 - 14.75)
        else:
            assert a["intrinsics"][2] == pytest.approx(14.75)
        assert not torch.equal(a["image"], plain["image"])           # colour jitter
        assert (a["image"] - plain["image"].flip(-1) if flipped
                else a["image"] - plain["image"]).abs().mean() < 0.2    # but mild
    assert flips == {True, False}


def test_simulated_folder_through_dataloader(tmp_path):
    root = write_dataset(tmp_path / "sim", "target", 2, height=48, width=64, seed=0, workers=1)
    ds = DepthDataset(build_reader("sim", root), 32, 32)
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["has_depth"].all()
    assert batch["valid"].all() and (batch["semantic"] >= 0).all()
    assert batch["intrinsics"][:, 0].gt(0).all()


def test_bad_size():
    with pytest.raises(ValueError, match="0x24"):
        DepthDataset([_frame()], 24, 0)


def test_jitter_strength_bounds_the_brightness_change():
    """The mean brightness of a mid-grey frame moves by at most the brightness factor's range."""
    frame = _frame()
    frame.rgb[:] = 128
    plain = DepthDataset([frame], 24, 32)[0]["image"].mean()
    spread = {}
    for jitter in (0.0, 0.2, 0.5):
        ds = DepthDataset([frame], 24, 32, augment=True, jitter=jitter)
        torch.manual_seed(0)
        ratios = torch.stack([ds[0]["image"].mean() / plain for _ in range(200)])
        assert ratios.min() >= 1 - jitter - 1e-6 and ratios.max() <= 1 + jitter + 1e-6
        spread[jitter] = float(ratios.max() - ratios.min())
    assert spread[0.0] < 1e-6 < spread[0.2] < spread[0.5]
    with pytest.raises(ValueError, match="jitter"):
        DataConfig(root="x", jitter=1.0)


def test_zoom_crops_a_window_and_keeps_every_ray():
    """A zoomed sample is a window of the frame seen by a longer lens: each output pixel's
    ray (through the new intrinsics) is the ray of the frame pixel it was taken from."""
    h, w = 60, 80
    ys, xs = np.mgrid[0:h, 0:w]
    frame = Frame(rgb=np.zeros((h, w, 3), np.uint8), depth=(1 + xs + 1000 * ys).astype(np.float32),
                  intrinsics=Intrinsics(fx=70.0, fy=70.0, cx=39.5, cy=29.5, width=w, height=h))
    ds = DepthDataset([frame], 30, 40, augment=True, jitter=0.0, zoom=2.0)
    torch.manual_seed(0)
    zooms = []
    for _ in range(20):
        sample = ds[0]
        fx, fy, cx, cy = sample["intrinsics"].tolist()
        code = sample["depth"][0].numpy().astype(np.int64) - 1
        src_x, src_y = code % 1000, code // 1000
        u, v = np.meshgrid(np.arange(40), np.arange(30))
        if (src_x[:, 1:] < src_x[:, :-1]).all():  # flipped: mirror back
            u = 39 - u
            cx = 39 - cx
        # the frame pixel each output pixel came from lies on the same ray (within a pixel)
        np.testing.assert_allclose((u - cx) / fx * 70 + 39.5, src_x, atol=1.0)
        np.testing.assert_allclose((v - cy) / fy * 70 + 29.5, src_y, atol=1.0)
        zooms.append(fx / (70 * 40 / 80))
    assert 1.0 <= min(zooms) and max(zooms) <= 2.0 + 1e-6 and max(zooms) - min(zooms) > 0.3


def test_zoom_one_is_no_zoom_and_bounds_are_checked():
    frame = _frame()
    torch.manual_seed(3)
    a = DepthDataset([frame], 24, 32, augment=True)[0]
    torch.manual_seed(3)
    b = DepthDataset([frame], 24, 32, augment=True, zoom=1.0)[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["intrinsics"], b["intrinsics"])
    with pytest.raises(ValueError, match="zoom"):
        DepthDataset([frame], 24, 32, zoom=0.5)
    with pytest.raises(ValueError, match="zoom"):
        DataConfig(root="x", zoom=8.0)
