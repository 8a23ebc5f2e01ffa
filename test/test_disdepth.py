"""DisDepth: LG-Conv, FAM/LAM, ghost decoder, attentive KD, warm-up, `depthkd distill`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from depthkd_core.cli import main
from depthkd_core.config import from_dict
from depthkd_core.data.simulator import write_dataset
from depthkd_core.losses import build_loss
from depthkd_core.methods.config import DistillConfig, load_distill_config
from depthkd_core.methods.disdepth import DisdepthConfig, task_target
from depthkd_core.methods.engine import build_method
from depthkd_core.models import ModelConfig, build_model, load_checkpoint, save_checkpoint
from depthkd_core.models.fam import LossAttention
from depthkd_core.models.lgconv import LGConv, insert_lgconv
from depthkd_core.train.supervised import build_datasets
from depthkd_core.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "config" / "distill" / "tiny.yaml"
from helpers import write_linear_onnx
SWIN = "swin_tiny_patch4_window7_224"


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("disdepth")
    sim = write_dataset(root / "sim", "sim", 4, height=64, width=64, workers=1)
    torch.manual_seed(0)
    out = {"root": root, "sim": sim}
    for name, encoder in (("swin", SWIN), ("cnn", "resnet18")):
        cfg = ModelConfig(name="teacher", encoder=encoder, head="bins", num_bins=16,
                          decoder_channels=(32, 16, 16, 8))
        out[name] = save_checkpoint(root / f"{name}.pt", build_model(cfg), cfg)
    return out


def _cfg(assets: dict[str, Path], *overrides: str) -> DistillConfig:
    return load_distill_config(TINY, [f"teacher={assets['swin']}", f"data.root={assets['sim']}",
                                      "method=disdepth", "model.head=bins", "model.num_bins=16",
                                      f"out_dir={assets['root'] / 'unused'}", *overrides])


def _batch(cfg: DistillConfig) -> dict[str, Any]:
    return next(iter(DataLoader(build_datasets(cfg.data)[0], batch_size=2)))


def _trainer(method: Any, student: nn.Module, cfg: DistillConfig) -> Trainer:
    return Trainer(student, method.step, build_datasets(cfg.data)[0], cfg,
                   extra_optimizers=method.extra_optimizers(), extra_modules=method.extra_modules())


def test_lgconv_equals_plain_conv_at_init() -> None:
    torch.manual_seed(0)
    local = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
    block = LGConv(local, 8, 16, stride=2, heads=4).eval()
    x = torch.randn(2, 8, 16, 12)
    with torch.no_grad():
        plain, out = local(x), block(x)
    diff = (out - plain).abs().max()
    assert 0 < float(diff) <= 1e-4 * float(plain.abs().max())  # active, but scaled by 1e-5
    nn.init.ones_(block.norm.weight)  # full-scale global branch: clearly not the plain conv
    with torch.no_grad():
        assert float((block(x) - plain).abs().max()) > 1e3 * float(diff)


def test_lgconv_shapes_and_backward() -> None:
    torch.manual_seed(0)
    block = LGConv(nn.Conv2d(6, 10, 3, stride=2, padding=1), 6, 10, stride=2, heads=3)
    out = block(torch.randn(2, 6, 15, 9))  # odd sizes: ceil-mode pooling matches the conv
    assert out.shape == (2, 10, 8, 5)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())


def test_insert_lgconv_keeps_pretrained_output() -> None:
    cfg = ModelConfig(encoder="mobilenetv2_050", head="bins", num_bins=16)
    torch.manual_seed(0)
    plain = build_model(cfg).eval()
    torch.manual_seed(0)  # same base weights: the LG branches are drawn after them
    lg = build_model(ModelConfig(**{**cfg.__dict__, "lgconv_stages": (-4, -3, -2, -1)})).eval()
    assert sum(isinstance(m, LGConv) for m in lg.modules()) == 4
    x = torch.rand(1, 3, 64, 64)
    a, b = plain(x), lg(x)
    assert torch.allclose(a, b, rtol=1e-3) and not torch.equal(a, b)
    swin = build_model(ModelConfig(name="teacher", encoder=SWIN, decoder_channels=(8, 8, 8, 8)))
    with pytest.raises(ValueError, match="CNN encoders"):
        insert_lgconv(swin)


def test_attentive_kd_hand_computed() -> None:
    s = torch.zeros(1, 2, 1, 2)
    t = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # per-pixel ||.||^2: 1+9=10, 4+16=20
    scores = torch.tensor([[[[0.25, 0.75]]]])
    loss = build_loss("attentive_kd")
    assert float(loss([s], [t], [scores])) == pytest.approx(0.25 * 10 + 0.75 * 20)
    assert float(loss([s, s], [t, t])) == pytest.approx(2 * 15.0)  # uniform 1/N, two levels
    with pytest.raises(ValueError, match="level 0"):
        loss([s], [t[:, :1]])


def test_lam_scores_sum_to_one() -> None:
    torch.manual_seed(0)
    scores = LossAttention(12, dim=8)(torch.randn(3, 12, 5, 7))
    assert scores.shape == (3, 1, 5, 7) and (scores >= 0).all()
    assert torch.allclose(scores.sum(dim=(1, 2, 3)), torch.ones(3), atol=1e-6)


def test_task_target_prefers_ground_truth() -> None:
    batch = {"has_depth": torch.tensor([True, False]), "depth": torch.full((2, 1, 2, 2), 3.0),
             "valid": torch.tensor([True, False, True, True]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)}
    teacher = torch.full((2, 1, 2, 2), 5.0)
    target, mask = task_target(batch, teacher, use_labels=True)
    assert target[0].eq(3).all() and target[1].eq(5).all()
    assert mask[0].sum() == 3 and mask[1].all()
    assert task_target(batch, teacher, use_labels=False)[0].eq(5).all()


def test_ghost_sync_and_gradients(assets: dict[str, Path]) -> None:
    cfg = _cfg(assets)
    method, student = build_method(cfg)
    teacher_before = {k: v.clone() for k, v in method.teacher_net.state_dict().items()}
    fam = method.aux.acclimation
    fam_before = [p.detach().clone() for p in fam.parameters()]
    batch = _batch(cfg)
    losses = method.step(student, batch)
    # weights synced in the step (BN running buffers then follow the ghost's own batch)
    ghost = dict(method.ghost.named_parameters())
    ref = {**{f"decoder.{k}": v for k, v in student.decoder.named_parameters()},
           **{f"head.{k}": v for k, v in student.head.named_parameters()}}
    assert ghost.keys() == ref.keys() and all(torch.equal(ghost[k], ref[k]) for k in ref)
    grads = torch.autograd.grad(losses["loss_aux"], list(fam.parameters()), retain_graph=True,
                                allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0  # through the ghost
    assert all(not p.requires_grad for p in method.ghost.parameters())
    for params, loss in ((fam.parameters(), "loss"), (student.parameters(), "loss_aux")):
        assert all(g is None for g in torch.autograd.grad(losses[loss], list(params),
                                                          retain_graph=True, allow_unused=True))
    _trainer(method, student, cfg)._update(batch)  # one real step: student and FAMs move
    assert any(not torch.equal(a, b) for a, b in zip(fam_before, fam.parameters()))
    assert all(torch.equal(v, method.teacher_net.state_dict()[k]) for k, v in teacher_before.items())
    stale = method.ghost.decoder.state_dict()
    assert any(not torch.equal(stale[k], v) for k, v in student.decoder.state_dict().items())
    method.ghost.sync(student)
    assert all(torch.equal(method.ghost.decoder.state_dict()[k], v)  # buffers too
               for k, v in student.decoder.state_dict().items())


def test_warmup_switches_kd_on(assets: dict[str, Path]) -> None:
    cfg = _cfg(assets, "max_steps=4", "method_kwargs.warmup_fraction=0.5")
    method, student = build_method(cfg)
    batch = _batch(cfg)
    weights = []
    for _ in range(3):
        out = method.step(student, batch)
        weights.append(float(out["kd_weight"]))
        expected = out["task_s"] + weights[-1] * out["akd"]
        assert float(out["loss"].detach()) == pytest.approx(float(expected), rel=1e-5)
        assert float(out["akd"]) > 0
    assert weights == pytest.approx([0.0, 0.0, 0.05])


@pytest.mark.parametrize("overrides", [(), ("method_kwargs.use_lam=false",),
                                       ("method_kwargs.use_fam=false", "method_kwargs.use_lam=false"),
                                       ("model.lgconv_stages=[-2,-1]",)])
def test_variants_step_finite(assets: dict[str, Path], overrides: tuple[str, ...]) -> None:
    cfg = _cfg(assets, "method_kwargs.warmup_fraction=0", *overrides)
    method, student = build_method(cfg)
    before = [p.detach().clone() for p in method.aux.acclimation.parameters()]
    losses = _trainer(method, student, cfg)._update(_batch(cfg))
    assert {"loss", "loss_aux", "task_s", "akd"} <= set(losses)
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, method.aux.acclimation.parameters()))


@pytest.mark.needs_shared
def test_refuses_cnn_and_onnx_teachers(assets: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="transformer teacher.*CNN encoder 'resnet18'"):
        build_method(_cfg(assets, f"teacher={assets['cnn']}"))
    with pytest.raises(ValueError, match="use_lam needs use_fam"):
        build_method(_cfg(assets, "method_kwargs.use_fam=false"))
    with pytest.raises(ValueError, match="stage features.*OnnxTeacher"):
        build_method(_cfg(assets, f"teacher={write_linear_onnx(assets['root'] / 'linear.onnx', 1.0, 0.5)}"))


def test_distill_cli_end_to_end(assets: dict[str, Path]) -> None:
    out = assets["root"] / "run"
    code = main(["distill", "--config", str(TINY), "--out", str(out), f"teacher={assets['swin']}",
                 f"data.root={assets['sim']}", "method=disdepth", "model.head=bins",
                 "model.num_bins=16", "model.lgconv_stages=[-4,-3,-2,-1]", "max_steps=2"])
    assert code == 0
    model, cfg, extra = load_checkpoint(out / "final.pt")
    assert cfg.lgconv_stages == (-4, -3, -2, -1) and extra["step"] == 2
    assert extra["config"]["method_kwargs"]["lambda_kd"] == 0.05
    assert torch.isfinite(model(torch.rand(1, 3, 64, 64))).all()
    ckpt = load_checkpoint(max(out.glob("ckpt_*.pt")))[2]
    assert int(ckpt["modules"]["disdepth"]["steps"]) == 2  # warm-up count survives resume


@pytest.mark.slow
def test_lgconv_student_exports_to_onnx(tmp_path: Path) -> None:
    from depthkd_core.export.onnx_export import export_onnx

    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="mobilenetv2_050", head="bins", num_bins=16,
                                    lgconv_stages=(-4, -3, -2, -1), decoder_channels=(32, 16, 16, 8)))
    for block in model.modules():
        if isinstance(block, LGConv):  # a trained-like global branch, not the 1e-5 start
            nn.init.ones_(block.norm.weight)
    assert export_onnx(model.eval(), tmp_path / "lg.onnx", 64, 64).passed


@pytest.mark.parametrize("name,fam,lam,lg", [("disdepth", True, True, False),
                                            ("disdepth_fam", True, False, False),
                                            ("disdepth_no_fa", False, False, False),
                                            ("disdepth_lg", True, True, True)])
def test_committed_configs(name: str, fam: bool, lam: bool, lg: bool) -> None:
    cfg = load_distill_config(REPO / "config" / "distill" / f"{name}.yaml")
    opts = from_dict(DisdepthConfig, cfg.method_kwargs)
    assert cfg.method == "disdepth" and cfg.model.head == "bins"
    assert (opts.use_fam, opts.use_lam, bool(cfg.model.lgconv_stages)) == (fam, lam, lg)
    assert opts.lambda_kd == 0.05 and opts.warmup_fraction == pytest.approx(7 / 25)
