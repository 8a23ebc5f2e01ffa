"""labelfree (Gao et al.): CWD, geometric distillation, alignment, the method and `depthkd distill`."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from depthkd_core.cli import main
from depthkd_core.data.frame import write_rgb
from depthkd_core.data.simulator import render_frame
from depthkd_core.geometry import Intrinsics, backproject_depth
from depthkd_core.losses.cwd import ChannelWiseDistillation
from depthkd_core.losses.geometric import (GeometricDistillation, PointNetEncoder, backproject,
                                           fill_intrinsics)
from depthkd_core.methods.config import load_distill_config
from depthkd_core.methods.engine import build_method
from depthkd_core.methods.labelfree import LabelfreeConfig, align_to, ssi_mse
from depthkd_core.models import load_checkpoint
from depthkd_core.train.supervised import build_datasets
from depthkd_core.train.trainer import Trainer
from helpers import save_tiny_teacher

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "config" / "distill" / "tiny.yaml"


def _kl(t: list[float], s: list[float], tau: float) -> float:
    zt, zs = sum(math.exp(v / tau) for v in t), sum(math.exp(v / tau) for v in s)
    return tau ** 2 * sum(math.exp(a / tau) / zt * ((a - b) / tau - math.log(zt) + math.log(zs))
                          for a, b in zip(t, s))


def test_cwd_hand_computed_kl() -> None:
    t, s = [0.0, 1.0, 2.0, 3.0], [1.0, 0.5, 0.0, 2.0]
    pred, target = torch.tensor(s).view(1, 1, 2, 2), torch.tensor(t).view(1, 1, 2, 2)
    raw = ChannelWiseDistillation(tau=2.0, normalisation="none")(pred, target)
    assert float(raw) == pytest.approx(_kl(t, s, 2.0), rel=1e-5)
    assert float(raw) == pytest.approx(0.4081896, abs=1e-6)  # tau^2 sum phi_T log(phi_T/phi_S)
    # median_mad: torch's median of an even count is the lower middle value.
    # t: median 1, MAD 1 -> [-1,0,1,2]; s: median 0.5, MAD (0.5+0+0.5+1.5)/4 = 0.625
    norm_s = [(v - 0.5) / 0.625 for v in s]
    normed = ChannelWiseDistillation(tau=1.0)(pred, target)
    assert float(normed) == pytest.approx(_kl([-1, 0, 1, 2], norm_s, 1.0), rel=1e-4)
    # shift/scale invariance (relative teachers), and zero for the same map
    assert float(ChannelWiseDistillation()(3 * target + 7, target)) == pytest.approx(0, abs=1e-6)
    # masked pixels do not count; a batch is the mean of its images
    mask = torch.tensor([True, True, True, False]).view(1, 1, 2, 2)
    masked = ChannelWiseDistillation(tau=2.0, normalisation="none")(pred, target, mask)
    assert float(masked) == pytest.approx(_kl(t[:3], s[:3], 2.0), rel=1e-5)
    both = ChannelWiseDistillation(tau=2.0, normalisation="none")(
        torch.cat([pred, target]), torch.cat([target, target]))
    assert float(both) == pytest.approx(_kl(t, s, 2.0) / 2, rel=1e-5)


def test_backproject_matches_numpy_geometry() -> None:
    torch.manual_seed(0)
    depth = torch.rand(2, 1, 6, 9) * 5 + 0.5
    cams = [Intrinsics(7.0, 8.0, 4.2, 2.7, 9, 6), Intrinsics(11.0, 9.5, 3.0, 3.5, 9, 6)]
    k = torch.tensor([c.as_tuple() for c in cams], dtype=torch.float32)
    points = backproject(depth, k)
    for i, cam in enumerate(cams):
        expected = backproject_depth(depth[i, 0].numpy(), cam)
        np.testing.assert_allclose(points[i].numpy(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="fx, fy must be > 0"):
        backproject(depth, torch.zeros(2, 4))


def test_fill_intrinsics_default_camera() -> None:
    given = torch.tensor([[0.0, 0, 0, 0], [5.0, 6, 1, 2]])
    filled, missing = fill_intrinsics(given, height=48, width=64, fx_fraction=0.8)
    assert missing == 1
    torch.testing.assert_close(filled, torch.tensor([[51.2, 51.2, 31.5, 23.5], [5.0, 6.0, 1.0, 2.0]]))


def test_pointnet_frozen_seeded_and_loadable(tmp_path: Path) -> None:
    net = PointNetEncoder(seed=3)
    state = torch.get_rng_state()
    same = PointNetEncoder(seed=3)
    assert torch.equal(state, torch.get_rng_state())  # caller's RNG untouched
    points = torch.randn(2, 10, 3)
    feats, glob = net(points)
    assert feats.shape == (2, 10, 1024) and glob.shape == (2, 1024)
    assert torch.equal(glob, feats.amax(dim=1))
    net.train()
    assert not net.training and torch.equal(net(points)[1], same(points)[1])
    assert not torch.equal(PointNetEncoder(seed=4)(points)[1], glob)
    torch.save(net.state_dict(), tmp_path / "pn.pt")
    assert torch.equal(PointNetEncoder(seed=9, weights=tmp_path / "pn.pt")(points)[1], glob)
    with pytest.raises(FileNotFoundError, match="PointNet weights"):
        PointNetEncoder(weights=tmp_path / "missing.pt")


def test_geometric_loss_zero_for_same_depth_positive_otherwise() -> None:
    torch.manual_seed(0)
    loss = GeometricDistillation(n_points=20)
    target = torch.rand(2, 1, 8, 8) + 1.0
    k = torch.tensor([[8.0, 8.0, 3.5, 3.5]] * 2)
    zero = loss(target.clone(), target, k)
    assert all(float(v) == 0.0 for v in zero.values())
    pred = (target + 0.1 * torch.randn_like(target)).requires_grad_(True)
    terms = loss(pred, target, k, generator=torch.Generator().manual_seed(1))
    assert all(float(terms[key].detach()) > 0 for key in ("input", "feature", "global"))
    parts = terms["input"] + terms["feature"] + terms["global"]
    assert float(terms["total"].detach()) == pytest.approx(float(parts.detach()), rel=1e-6)
    again = loss(pred, target, k, generator=torch.Generator().manual_seed(1))
    assert torch.equal(terms["total"], again["total"])  # same sampled pixels
    terms["total"].backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.pointnet.parameters())  # frozen PointNet
    # only the sampled pixels receive gradient
    assert int((pred.grad != 0).flatten(1).any(0).sum()) == 20


def test_align_to_recovers_scale_and_shift() -> None:
    source = torch.rand(2, 1, 5, 5) + 0.1
    ref = torch.cat([3.0 * source[:1] + 0.5, 0.25 * source[1:] - 0.1])
    torch.testing.assert_close(align_to(source, ref, "lsq"), ref, rtol=1e-4, atol=1e-5)
    median = align_to(source, 2.0 * source, "median")
    torch.testing.assert_close(median, 2.0 * source)


def test_options_validation() -> None:
    with pytest.raises(ValueError, match="not all 0"):
        LabelfreeConfig(w_cwd=0, w_geo=0)
    with pytest.raises(ValueError, match="alignment"):
        LabelfreeConfig(alignment="mean")
    with pytest.raises(ValueError, match="normalisation"):
        LabelfreeConfig(normalisation="zscore")


@pytest.mark.parametrize("name,weights", [("labelfree", (1.0, 1.0, 0.0)),
                                          ("labelfree_cwd", (1.0, 0.0, 0.0)),
                                          ("labelfree_mse", (0.0, 0.0, 1.0))])
def test_committed_configs(name: str, weights: tuple[float, float, float]) -> None:
    cfg = load_distill_config(REPO / "config" / "distill" / f"{name}.yaml")
    opts = LabelfreeConfig(**cfg.method_kwargs)
    assert cfg.method == "labelfree" and cfg.data.reader == "images"
    assert (opts.w_cwd, opts.w_geo, opts.w_mse) == weights


def _tiny_relative_hf(folder: Path) -> None:
    from transformers import (AutoModelForDepthEstimation, DepthAnythingConfig, Dinov2Config,
                              DPTImageProcessor)

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=64, image_size=56, patch_size=14,
                            out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32,
                                 fusion_hidden_size=16, neck_hidden_sizes=[16, 16, 16, 16],
                                 head_hidden_size=16)
    torch.manual_seed(0)
    AutoModelForDepthEstimation.from_config(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)


def _write_bag(path: Path, frames: list[np.ndarray]) -> None:
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    Image, Info = ts.types["sensor_msgs/msg/Image"], ts.types["sensor_msgs/msg/CameraInfo"]
    header = ts.types["std_msgs/msg/Header"](
        stamp=ts.types["builtin_interfaces/msg/Time"](sec=1, nanosec=0), frame_id="cam")
    roi = ts.types["sensor_msgs/msg/RegionOfInterest"](0, 0, 0, 0, False)
    h, w = frames[0].shape[:2]
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        info = writer.add_connection("/cam/camera_info", Info.__msgtype__, typestore=ts)
        image = writer.add_connection("/cam/image_raw", Image.__msgtype__, typestore=ts)
        k = np.array([50.0, 0, 31.5, 0, 50.0, 31.5, 0, 0, 1])
        writer.write(info, 1, ts.serialize_cdr(Info(header, h, w, "plumb_bob", np.zeros(5), k,
                                                    np.eye(3).ravel(), np.zeros(12), 0, 0, roi),
                                               Info.__msgtype__))
        for i, rgb in enumerate(frames):
            msg = Image(header, h, w, "rgb8", 0, w * 3, rgb.ravel())
            writer.write(image, 10 + i, ts.serialize_cdr(msg, Image.__msgtype__))


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("labelfree")
    frames = [render_frame("target", seed, height=64, width=64).rgb for seed in range(3)]
    (root / "images").mkdir()
    for i, rgb in enumerate(frames):
        write_rgb(root / "images" / f"{i:03d}.png", rgb)
    _write_bag(root / "bag", frames)
    _tiny_relative_hf(root / "hf")
    save_tiny_teacher(root / "metric.pt")
    return {"root": root, "images": root / "images", "bag": root / "bag", "hf": root / "hf",
            "metric": root / "metric.pt"}


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("teacher,reader", [("hf", "images"), ("metric", "images"), ("hf", "rosbag")])
def test_step_updates_only_the_student(assets: dict[str, Path], teacher: str, reader: str,
                                       caplog: pytest.LogCaptureFixture) -> None:
    root = assets["bag"] if reader == "rosbag" else assets["images"]
    cfg = load_distill_config(TINY, [f"teacher={assets[teacher]}", "method=labelfree",
                                     f"data.reader={reader}", f"data.root={root}",
                                     "method_kwargs.w_mse=0.5", f"out_dir={assets['root'] / 'x'}"])
    method, student = build_method(cfg)
    assert method.teacher.is_metric is (teacher == "metric")
    train = build_datasets(cfg.data)[0]
    batch = next(iter(DataLoader(train, batch_size=2)))
    batch["depth"] = torch.full_like(batch["depth"], float("nan"))  # unlabelled: never read
    before_s, before_t = _snapshot(student), _snapshot(method.teacher.module)
    before_p = _snapshot(method.geometric.pointnet)
    with caplog.at_level(logging.WARNING, logger="depthkd_core.methods.labelfree"):
        losses = Trainer(student, method.step, train, cfg)._update(batch)
    assert {"loss", "cwd", "geo", "geo_input", "geo_feature", "geo_global", "mse"} <= set(losses)
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert any(not torch.equal(before_s[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(before_t[k], v) for k, v in method.teacher.module.state_dict().items())
    assert all(torch.equal(before_p[k], v) for k, v in method.geometric.pointnet.state_dict().items())
    # image folders have no intrinsics -> the default camera, said in the log; the bag has them
    assert ("default camera" in caplog.text) is (reader == "images")


def test_distill_cli_from_image_folder_with_relative_hf_teacher(assets: dict[str, Path]) -> None:
    out = assets["root"] / "run"
    assert main(["distill", "--config", str(TINY), "--out", str(out), "method=labelfree",
                 f"teacher={assets['hf']}", "data.reader=images", f"data.root={assets['images']}",
                 "method_kwargs.n_points=256"]) == 0
    model, _, extra = load_checkpoint(out / "final.pt")
    assert extra["step"] == 2 and extra["config"]["method"] == "labelfree"
    assert extra["config"]["method_kwargs"]["n_points"] == 256
    assert set(extra["config"]["method_kwargs"]) == set(LabelfreeConfig.__dataclass_fields__)
    depth = model.eval()(torch.rand(1, 3, 64, 64))
    assert torch.isfinite(depth).all()


def test_relative_teacher_becomes_depth_of_the_student(assets: dict[str, Path]) -> None:
    cfg = load_distill_config(TINY, [f"teacher={assets['hf']}", "method=labelfree",
                                     "data.reader=images", f"data.root={assets['images']}"])
    method, _ = build_method(cfg)
    assert method.teacher.is_inverse and not method.teacher.is_metric
    student_depth = torch.rand(2, 1, 8, 8) * 4 + 0.5
    disparity = 2.0 / student_depth + 3.0  # relative inverse depth: unknown scale and shift
    torch.testing.assert_close(method.depth_target(disparity, student_depth), student_depth,
                               rtol=1e-4, atol=1e-4)
    assert float(method.cwd(method.teacher_space(student_depth), disparity)) == pytest.approx(0, abs=1e-5)


def test_ssi_mse_flat_affine_and_invariance() -> None:
    torch.manual_seed(0)
    target = torch.rand(2, 1, 8, 8)
    assert float(ssi_mse(torch.full_like(target, 3.0), target)) == pytest.approx(1.0, abs=1e-5)
    assert float(ssi_mse(2.5 * target - 1.0, target)) == pytest.approx(0.0, abs=1e-5)
    pred = torch.rand(2, 1, 8, 8)
    assert float(ssi_mse(4.0 * pred + 7.0, target)) == pytest.approx(float(ssi_mse(pred, target)), rel=1e-4)
    assert 0.0 < float(ssi_mse(pred, target)) < 1.0


class _Scaled(torch.nn.Module):
    """A 'student' whose depth is c * base: the direction in which relative losses must not pull."""

    def __init__(self, base: torch.Tensor) -> None:
        super().__init__()
        self.base, self.c = base, torch.nn.Parameter(torch.ones(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.c * self.base


@pytest.mark.parametrize("term", ["mse", "geo"])
def test_relative_terms_do_not_pull_on_the_students_scale(assets: dict[str, Path], term: str) -> None:
    """With a relative teacher the student's scale is free: the MSE and geometric terms are
    scale-invariant and their gradient along the scale is ~0 (a loss in metres on a target
    fitted to the student shrank the benchmark's students to min_depth)."""
    weights = {"mse": ["method_kwargs.w_cwd=0", "method_kwargs.w_geo=0", "method_kwargs.w_mse=1"],
               "geo": ["method_kwargs.w_cwd=0", "method_kwargs.w_geo=1", "method_kwargs.w_mse=0"]}
    cfg = load_distill_config(TINY, [f"teacher={assets['hf']}", "method=labelfree",
                                     "data.reader=images", f"data.root={assets['images']}",
                                     "method_kwargs.n_points=64", *weights[term]])
    method, _ = build_method(cfg)
    assert not method.teacher.is_metric
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 32)
    student = _Scaled(1.0 + 2.0 * torch.rand(2, 1, 32, 32))
    values = []
    for c in (1.0, 0.5):
        student.c.data.fill_(c)
        student.c.grad = None
        torch.manual_seed(2)  # the same sampled pixels
        loss = method.step(student, {"image": images})["loss"]
        loss.backward()
        values.append(float(loss.detach()))
        assert abs(float(student.c.grad)) <= 1e-3 * max(float(loss.detach()), 1e-6) + 1e-6, (c, float(student.c.grad))
    assert values[1] == pytest.approx(values[0], rel=1e-3) and values[0] > 0

