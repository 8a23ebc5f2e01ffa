"""tiekd (TIE-KD): DPM construction, DPM KL, SSIM, the method and `depthkd distill` (checkpoint + ONNX teachers)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from depthkd_core.cli import main
from depthkd_core.data.simulator import write_dataset
from depthkd_core.losses import build_loss
from depthkd_core.losses.dpm_kl import DPMKLDivergence, teacher_dpm
from depthkd_core.losses.ssim import SSIMLoss
from depthkd_core.methods.config import load_distill_config
from depthkd_core.methods.engine import build_method
from depthkd_core.methods.tiekd import TiekdConfig
from depthkd_core.models import load_checkpoint
from depthkd_core.models.heads import dpm_centers
from depthkd_core.train.supervised import build_datasets
from depthkd_core.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "config" / "distill" / "tiny.yaml"
from helpers import save_tiny_teacher, write_linear_onnx


def test_dpm_sums_to_one_and_peaks_at_the_teachers_bin() -> None:
    centers = dpm_centers(0.1, 10.0, 64, "log")
    depth = torch.tensor([0.1, 0.37, 1.0, 2.5, 9.9, 10.0]).view(1, 1, 2, 3)
    dpm = teacher_dpm(depth, centers, sigma=0.5)
    assert dpm.shape == (1, 64, 2, 3)
    torch.testing.assert_close(dpm.sum(dim=1), torch.ones(1, 2, 3))
    nearest = (centers.view(1, -1, 1, 1) - depth).abs().argmin(dim=1)
    assert torch.equal(dpm.argmax(dim=1), nearest)
    # hand-computed: 3 linear bins 1, 2, 3 m, sigma 1, depth 2 m
    three = teacher_dpm(torch.full((1, 1, 1, 1), 2.0), torch.tensor([1.0, 2.0, 3.0]), 1.0).flatten()
    e = math.exp(-0.5)
    torch.testing.assert_close(three, torch.tensor([e, 1.0, e]) / (1 + 2 * e))


def test_dpm_kl_hand_computed_and_zero_at_the_teacher() -> None:
    centers = torch.tensor([1.0, 2.0, 3.0])
    depth = torch.full((1, 1, 1, 2), 2.0)
    p_t = teacher_dpm(depth, centers, 1.0)
    loss = DPMKLDivergence(sigma=1.0)
    assert float(loss(p_t, centers, depth)) == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full((1, 3, 1, 2), 1 / 3)
    pt = p_t[0, :, 0, 0].tolist()
    expected = sum(p * math.log(p / (1 / 3)) for p in pt)
    assert float(loss(uniform, centers, depth)) == pytest.approx(expected, rel=1e-5)
    # invalid teacher pixels (0, NaN) are skipped
    bad = torch.tensor([2.0, float("nan")]).view(1, 1, 1, 2)
    assert float(loss(uniform, centers, bad)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="sigma"):
        DPMKLDivergence(sigma=0.0)


def test_ssim_against_closed_form() -> None:
    x = torch.rand(1, 1, 16, 16) * 5
    assert float(SSIMLoss(window_size=7)(x, x)) == pytest.approx(0.0, abs=1e-6)
    # constant images a, b: mu = a, b, sigma = 0 -> SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, L = 2.0, 3.0, 10.0
    c1 = (0.01 * L) ** 2
    ssim = (2 * a * b + c1) / (a * a + b * b + c1)
    loss = build_loss("ssim", window_size=7, max_val=L)
    # float64: kornia's E[x^2] - mu^2 leaves ~1e-7 of variance in float32
    value = loss(torch.full((1, 1, 9, 9), a, dtype=torch.float64),
                 torch.full((1, 1, 9, 9), b, dtype=torch.float64))
    assert float(value) == pytest.approx((1 - ssim) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="odd"):
        SSIMLoss(window_size=4)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiekd")
    sim = write_dataset(root / "target", "target", 2, height=64, width=64, workers=1)
    return {"root": root, "sim": sim, "teacher": save_tiny_teacher(root / "teacher.pt")}


def _args(assets: dict[str, Path], teacher: Path | None = None) -> list[str]:
    return [f"teacher={teacher or assets['teacher']}", f"data.root={assets['sim']}", "method=tiekd",
            "model.head=dpm", "model.num_bins=16"]


def test_step_updates_only_the_student(assets: dict[str, Path]) -> None:
    cfg = load_distill_config(TINY, [*_args(assets), f"out_dir={assets['root'] / 'x'}"])
    method, student = build_method(cfg)
    train = build_datasets(cfg.data)[0]
    batch = next(iter(DataLoader(train, batch_size=2)))
    before_s = {k: v.clone() for k, v in student.state_dict().items()}
    before_t = {k: v.clone() for k, v in method.teacher.module.state_dict().items()}
    losses = Trainer(student, method.step, train, cfg)._update(batch)
    assert set(losses) == {"loss", "dpm_kl", "ssim"} and all(torch.isfinite(v) for v in losses.values())
    alpha = method.options.alpha
    assert float(losses["loss"]) == pytest.approx(
        float(alpha * losses["dpm_kl"] + (1 - alpha) * losses["ssim"]), rel=1e-5)
    assert any(not torch.equal(before_s[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(before_t[k], v) for k, v in method.teacher.module.state_dict().items())


def test_errors_name_the_problem(assets: dict[str, Path]) -> None:
    direct = load_distill_config(TINY, [*_args(assets)[:3], "model.head=direct"])
    with pytest.raises(ValueError, match="model.head: dpm"):
        build_method(direct)
    with pytest.raises(ValueError, match="alpha"):
        TiekdConfig(alpha=1.5)


@pytest.mark.parametrize("onnx", [False, True])
def test_distill_cli_end_to_end(assets: dict[str, Path], onnx: bool) -> None:
    out = assets["root"] / f"run_{onnx}"
    teacher = write_linear_onnx(assets["root"] / "linear.onnx", 2.0, 1.0) if onnx else assets["teacher"]
    assert main(["distill", "--config", str(TINY), "--out", str(out), *_args(assets, teacher)]) == 0
    model, model_cfg, extra = load_checkpoint(out / "final.pt")
    assert model_cfg.head == "dpm" and model_cfg.num_bins == 16 and extra["step"] == 2
    assert extra["config"]["method_kwargs"] == {"alpha": 0.5, "sigma": 0.5, "ssim_window": 11}
    probs = model.eval().forward_dict(torch.rand(1, 3, 64, 64))["probs"]
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1, 64, 64))


@pytest.mark.parametrize("name,method,loss", [("tiekd", "tiekd", "hu_depth"),
                                              ("tiekd_kd_mse", "kd_ood", "mse"),
                                              ("tiekd_kd_hu", "kd_ood", "hu_depth")])
def test_committed_configs(name: str, method: str, loss: str) -> None:
    cfg = load_distill_config(REPO / "config" / "distill" / f"{name}.yaml")
    assert cfg.method == method and cfg.loss == loss
    assert cfg.model.head == ("dpm" if method == "tiekd" else "direct")
    assert cfg.model.encoder == "mobilenetv2_100" and cfg.data.root == "data/target_train"
