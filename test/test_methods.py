"""Distillation methods and `depthkd distill` on tiny data (kd_ood, noise, dfad, datafree)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from depthkd_core.cli import main
from depthkd_core.data.mixing import ObjectMixer
from depthkd_core.data.simulator import write_dataset
from depthkd_core.methods import METHODS
from depthkd_core.methods.config import DistillConfig, load_distill_config
from depthkd_core.methods.datafree import DatafreeConfig, check_g_teacher
from depthkd_core.methods.deepinversion import invert_batch
from depthkd_core.methods.engine import IndexOnly, build_method
from depthkd_core.methods.kd_features import feature_maps, hint_loss
from depthkd_core.models import (load_checkpoint, load_teacher)
from depthkd_core.models.transform_net import TransformationNet
from depthkd_core.train.supervised import build_datasets
from depthkd_core.train.trainer import Trainer
from helpers import TINY_FASTDEPTH, save_tiny_fastdepth_onnx, save_tiny_teacher

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "config" / "distill" / "tiny.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill")
    sim = write_dataset(root / "sim", "sim", 4, height=64, width=64, workers=1)
    return {"root": root, "sim": sim, "teacher": save_tiny_teacher(root / "teacher.pt")}


def _cfg(assets: dict[str, Path], *overrides: str) -> DistillConfig:
    return load_distill_config(TINY, [f"teacher={assets['teacher']}", f"data.root={assets['sim']}",
                                      f"out_dir={assets['root'] / 'unused'}", *overrides])


def _batch(cfg: DistillConfig) -> dict[str, Any]:
    train, _ = build_datasets(cfg.data)
    return next(iter(DataLoader(train, batch_size=2)))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_transformation_net_near_identity() -> None:
    torch.manual_seed(0)
    g = TransformationNet()
    x = torch.rand(2, 3, 37, 50)  # odd size: padded inside, cropped back
    y = g(x)
    values = y.detach()
    assert y.shape == x.shape and 0 <= float(values.min()) and float(values.max()) <= 1
    assert 0 < float((values - x).abs().max()) < 0.02
    y.sum().backward()
    assert all(p.grad is not None for p in g.parameters())


@pytest.mark.parametrize("method", ["kd_ood", "noise", "dfad", "datafree"])
def test_step_updates_intended_parameters(assets: dict[str, Path], method: str) -> None:
    cfg = _cfg(assets, f"method={method}", "max_steps=1")
    distiller, student = build_method(cfg)
    teacher = distiller.teacher.module
    before_t, before_s = _snapshot(teacher), _snapshot(student)
    extras = distiller.extra_modules()
    before_x = {k: _snapshot(m) for k, m in extras.items()}
    train = build_datasets(cfg.data)[0] if distiller.uses_data else IndexOnly(2)
    losses = Trainer(student, distiller.step, train, cfg, extra_optimizers=distiller.extra_optimizers(),
                     extra_modules=extras)._update(next(iter(DataLoader(train, batch_size=2))))
    assert "loss" in losses and all(torch.isfinite(v).all() for v in losses.values())
    assert _changed(before_s, student)
    assert not _changed(before_t, teacher)  # frozen, BN running stats included
    assert set(extras) == {"dfad": {"generator"}, "datafree": {"transform"}}.get(method, set())
    for name, module in extras.items():
        assert _changed(before_x[name], module), name


@pytest.mark.parametrize("method", ["dfad", "datafree"])
def test_losses_reach_only_their_own_network(assets: dict[str, Path], method: str) -> None:
    cfg = _cfg(assets, f"method={method}")
    distiller, student = build_method(cfg)
    batch = _batch(cfg) if distiller.uses_data else {"index": torch.arange(2)}
    losses = distiller.step(student, batch)
    (extra,) = distiller.extra_modules().values()
    grads = torch.autograd.grad(losses["loss"], list(extra.parameters()), allow_unused=True,
                                retain_graph=True)
    assert all(g is None for g in grads)  # the student loss sees G's output detached
    if method == "datafree":  # L_G does not involve the student at all
        grads = torch.autograd.grad(losses["loss_g"], list(student.parameters()), allow_unused=True)
        assert all(g is None for g in grads)


def test_datafree_terms_and_depth_unused(assets: dict[str, Path]) -> None:
    cfg = _cfg(assets)
    distiller, student = build_method(cfg)
    batch = _batch(cfg)
    batch["depth"] = torch.full_like(batch["depth"], float("nan"))  # never read
    depth = batch["depth"]
    torch.manual_seed(3)
    losses = {k: v.detach() for k, v in distiller.step(student, batch).items()}
    assert batch["depth"] is depth and torch.isnan(depth).all()
    assert all(torch.isfinite(v) for v in losses.values())
    opts = distiller.options
    expected = opts.beta * losses["bn"] + opts.alpha * losses["recon"]
    assert float(losses["loss_g"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(losses["loss"]) == pytest.approx(float(losses["kd_x"] + losses["kd_aug"]), rel=1e-5)


def test_ablation_switches(assets: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    batch = _batch(_cfg(assets))
    no_recon, s = build_method(_cfg(assets, "method_kwargs.recon=false"))
    out = {k: v.detach() for k, v in no_recon.step(s, batch).items()}
    assert float(out["loss_g"]) == pytest.approx(float(1e-3 * out["bn"]), rel=1e-5)

    no_g, s = build_method(_cfg(assets, "method_kwargs.use_g=false"))
    assert no_g.extra_optimizers() == {} and no_g.extra_modules() == {}
    assert set(no_g.step(s, batch)) == {"loss", "kd_x", "kd_aug"}

    also_gx, s = build_method(_cfg(assets, "method_kwargs.kd_on_gx=true"))
    out = {k: v.detach() for k, v in also_gx.step(s, batch).items()}
    assert float(out["loss"]) == pytest.approx(float(out["kd_x"] + out["kd_aug"] + out["kd_gx"]),
                                               rel=1e-5)

    calls = []
    original = ObjectMixer.__call__
    monkeypatch.setattr(ObjectMixer, "__call__",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    with_mix, s = build_method(_cfg(assets))
    with_mix.step(s, batch)
    assert calls == [1]
    no_mix, s = build_method(_cfg(assets, "method_kwargs.mixing=false"))
    no_mix.step(s, batch)
    assert calls == [1]  # no_mix never calls the mixer
    with pytest.raises(ValueError, match="kd_on_gx needs use_g"):
        build_method(_cfg(assets, "method_kwargs.use_g=false", "method_kwargs.kd_on_gx=true"))


@pytest.fixture(scope="module")
def onnx_teacher(assets: dict[str, Path]) -> Path:
    """An ONNX teacher of FastDepth's architecture (BN folded away, convertible to torch)."""
    return save_tiny_fastdepth_onnx(assets["root"] / "tiny_fastdepth.onnx")


def test_onnx_teacher_refused_for_g_and_mixing_only_works(assets: dict[str, Path], onnx_teacher: Path) -> None:
    with pytest.raises(ValueError) as err:
        build_method(_cfg(assets, f"teacher={onnx_teacher}"))
    message = str(err.value)
    assert "BatchNorm statistics and gradients" in message and "use_g: false" in message
    assert "mixing-only" in message and "BatchNorm folded" in message
    out = assets["root"] / "onnx_mixing_only"
    assert main(["distill", "--config", str(TINY), "--out", str(out), f"teacher={onnx_teacher}",
                 f"data.root={assets['sim']}", "method_kwargs.use_g=false"]) == 0
    model, _, extra = load_checkpoint(out / "final.pt")
    assert extra["step"] == 2 and extra["config"]["method_kwargs"]["use_g"] is False


def test_dfad_trains_its_generator_through_an_onnx_teacher(assets: dict[str, Path], onnx_teacher: Path) -> None:
    method, student = build_method(_cfg(assets, f"teacher={onnx_teacher}", "method=dfad"))
    assert method.teacher.differentiable and method.teacher.module is not None
    losses = method.step(student, {"index": torch.arange(2)})
    losses["loss_g"].backward()
    grads = [p.grad for p in method.generator.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("method", ["kd_ood", "noise", "dfad", "datafree"])
def test_distill_cli_end_to_end(assets: dict[str, Path], method: str) -> None:
    out = assets["root"] / f"run_{method}"
    assert main(["distill", "--config", str(TINY), "--out", str(out), f"method={method}",
                 f"teacher={assets['teacher']}", f"data.root={assets['sim']}"]) == 0
    model, model_cfg, extra = load_checkpoint(out / "final.pt")
    assert model_cfg.encoder == "mobilenetv2_050" and extra["step"] == 2
    assert extra["config"]["method"] == method
    depth = model.eval()(torch.rand(1, 3, 64, 64))
    assert depth.shape == (1, 1, 64, 64) and torch.isfinite(depth).all()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert set(saved["method_kwargs"]) == set(METHODS.get(method).Config.__dataclass_fields__)


def test_resume_is_exact(assets: dict[str, Path]) -> None:
    base = [f"teacher={assets['teacher']}", f"data.root={assets['sim']}", "max_steps=3"]
    straight, halted = assets["root"] / "straight", assets["root"] / "halted"
    assert main(["distill", "--config", str(TINY), "--out", str(straight), *base]) == 0
    assert main(["distill", "--config", str(TINY), "--out", str(halted), *base[:2],
                 "max_steps=2", "ckpt_every=1"]) == 0
    assert main(["distill", "--config", str(TINY), "--out", str(halted), "--resume", *base]) == 0
    a, _, _ = load_checkpoint(straight / "final.pt")
    b, _, _ = load_checkpoint(halted / "final.pt")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_config_errors(assets: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="teacher must name"):
        load_distill_config(TINY, ['teacher=""'])
    with pytest.raises(KeyError, match="unknown method"):
        build_method(_cfg(assets, "method=nope"))
    with pytest.raises(ValueError, match="unknown config key"):
        build_method(_cfg(assets, "method_kwargs.gamma=2"))


def test_per_batch_inversion_lowers_bn_loss(assets: dict[str, Path]) -> None:
    teacher = load_teacher(assets["teacher"])
    bn_loss = check_g_teacher(teacher)
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    opts = DatafreeConfig()
    start = invert_batch(x, teacher, bn_loss, opts, iterations=1)
    assert start.iterations == 1
    result = invert_batch(x, teacher, bn_loss, opts, iterations=6, lr=0.05)
    assert result.iterations == 6 and result.bn < start.bn
    assert 0 <= float(result.images.min()) and float(result.images.max()) <= 1
    stopped = invert_batch(x, teacher, bn_loss, opts, iterations=50, target_bn=1e9)
    assert stopped.iterations == 0 and torch.equal(stopped.images, x)


def test_bench_transform_cli(assets: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = assets["root"] / "bench.json"
    assert main(["bench-transform", "--teacher", str(assets["teacher"]), "--data", str(assets["sim"]),
                 "--height", "64", "--width", "64", "--batch-size", "2", "--g-steps", "2",
                 "--max-iterations", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| G, one forward" in printed and "per-batch optimisation" in printed
    result = json.loads(out.read_text())
    assert result["g_steps"] == 2 and result["inversion_iterations"] <= 3
    assert result["bn_g"] > 0 and result["g_forward_s"] > 0


def _fastdepth_cfg(assets: dict[str, Path], teacher: Path, *overrides: str) -> DistillConfig:
    widths = [f"model.{k}=[{','.join(map(str, v))}]" for k, v in TINY_FASTDEPTH.items()]
    return _cfg(assets, f"teacher={teacher}", "method=kd_features", "model.name=fastdepth",
                f"model.pretrained={teacher}", *widths, *overrides)


def test_kd_features_holds_the_student_to_the_teacher_maps(assets: dict[str, Path], onnx_teacher: Path) -> None:
    """The teacher itself at the teacher's input scores 0 on both terms; at a smaller input
    it does not, and one step moves only the student, hints reaching its encoder."""
    same, student = build_method(_fastdepth_cfg(assets, onnx_teacher))
    batch = _batch(same.cfg)
    with torch.no_grad():
        losses = same.step(student, batch)
    assert float(losses["hints"]) < 1e-10 and float(losses["kd"]) < 1e-4
    smaller, student = build_method(_fastdepth_cfg(assets, onnx_teacher, "model.input_size=[32,32]",
                                                   "method_kwargs.layers=[E13,D1]"))
    assert float(smaller.step(student, batch)["hints"]) > 1e-4
    with torch.no_grad():
        target = smaller.feature_teacher.forward_dict(batch["image"])
    hints = hint_loss(feature_maps(student.forward_dict(batch["image"]), ("E5",)),
                      feature_maps(target, ("E5",)))
    grads = torch.autograd.grad(hints, list(student.encoder.parameters()), allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    assert all(g is None for g in torch.autograd.grad(hints, list(student.decoder.parameters()),
                                                       allow_unused=True))
    teacher_before = _snapshot(smaller.feature_teacher)
    Trainer(student, smaller.step, build_datasets(smaller.cfg.data)[0], smaller.cfg)._update(batch)
    assert not _changed(teacher_before, smaller.feature_teacher)


def test_kd_features_refuses_what_it_cannot_hold(assets: dict[str, Path], onnx_teacher: Path) -> None:
    with pytest.raises(ValueError, match="fastdepth student"):
        build_method(_cfg(assets, f"teacher={onnx_teacher}", "method=kd_features"))
    with pytest.raises(ValueError, match="student's own widths"):  # a pruned student
        build_method(_fastdepth_cfg(assets, onnx_teacher, "model.pretrained=null",
                                    "model.decoder_channels=[8,8,8,8,16]"))
    with pytest.raises(ValueError, match="layers"):
        build_method(_fastdepth_cfg(assets, onnx_teacher, "method_kwargs.layers=[E99]"))
    cut = ("model.pretrained=null", "model.decoder_stages=2", "model.input_size=[32,32]")
    with pytest.raises(ValueError, match=r"\['D3'\].*stops after stage 2"):
        build_method(_fastdepth_cfg(assets, onnx_teacher, *cut, "method_kwargs.layers=[E13,D3]"))
    # a student with its decoder cut is held to the maps it has, of the whole teacher
    method, student = build_method(_fastdepth_cfg(assets, onnx_teacher, *cut))
    assert len(method.feature_teacher.decoder) == 5 and len(student.decoder) == 2
    assert float(method.step(student, _batch(method.cfg))["hints"]) > 0
