"""DepthNet registry entries, heads, pretrained loading, checkpoints, ONNX export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from depthkd_core.models import (HEADS, MODELS, DepthNet, ModelConfig, build_model, dpm_centers,
                                 load_checkpoint, save_checkpoint)

STUDENT_ENCODERS = ["mobilenetv2_100", "mobilenetv2_050", "mobilenetv3_large_100",
                    "efficientnet_b0", "resnet18", "resnet34"]
TEACHER_ENCODERS = [("resnet50", None, (64, 64)),
                    ("swin_tiny_patch4_window7_224", None, (64, 96)),
                    ("vit_small_patch16_224", (64, 96), (64, 96))]


def _check_forward_backward(model: DepthNet, size: tuple[int, int], batch: int = 2) -> None:
    x = torch.rand(batch, 3, *size)
    depth = model(x)
    assert depth.shape == (batch, 1, *size)
    assert torch.isfinite(depth).all()
    cfg = model.cfg
    assert cfg.min_depth <= depth.min() and depth.max() <= cfg.max_depth
    depth.mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("encoder", STUDENT_ENCODERS)
def test_student_encoders(encoder: str) -> None:
    torch.manual_seed(0)
    _check_forward_backward(build_model(ModelConfig(name="student", encoder=encoder)), (64, 64))


@pytest.mark.parametrize("encoder,input_size,size", TEACHER_ENCODERS)
def test_teacher_encoders(encoder: str, input_size, size) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(name="teacher", encoder=encoder, input_size=input_size,
                      decoder_channels=(64, 32, 32, 16))
    _check_forward_backward(build_model(cfg), size, batch=1)


@pytest.mark.parametrize("head", ["direct", "bins", "dpm"])
def test_heads_shape_and_backward(head: str) -> None:
    torch.manual_seed(0)
    _check_forward_backward(build_model(ModelConfig(encoder="mobilenetv2_050", head=head)), (64, 64))


def test_registries_list_entries() -> None:
    assert {"student", "teacher"} <= set(MODELS.keys())
    assert {"direct", "bins", "dpm"} <= set(HEADS.keys())
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        build_model(ModelConfig(name="nope"))


def test_direct_head_zero_logit_is_geometric_mean() -> None:
    model = build_model(ModelConfig(encoder="mobilenetv2_050", head="direct", min_depth=0.1,
                                    max_depth=10.0)).eval()
    torch.nn.init.zeros_(model.head.conv.weight)
    torch.nn.init.zeros_(model.head.conv.bias)
    depth = model(torch.rand(1, 3, 64, 64))
    assert torch.allclose(depth, torch.ones_like(depth), atol=1e-5)  # sqrt(0.1 * 10)


def test_bins_head_adabins_properties() -> None:
    torch.manual_seed(1)
    cfg = ModelConfig(encoder="mobilenetv2_050", head="bins", min_depth=0.5, max_depth=8.0, num_bins=16)
    out = build_model(cfg).eval().forward_dict(torch.rand(2, 3, 64, 96))
    widths, centers = out["bin_widths"], out["bin_centers"]
    assert widths.shape == centers.shape == (2, 16)
    assert torch.allclose(widths.sum(1), torch.full((2,), 7.5), atol=1e-4)
    assert (centers.diff(dim=1) > 0).all()
    assert (centers > 0.5).all() and (centers < 8.0).all()
    # centre k = d_min + sum_{j<k} w_j + w_k / 2 (hand-written for bin 0 and 1)
    assert torch.allclose(centers[:, 0], 0.5 + widths[:, 0] / 2)
    assert torch.allclose(centers[:, 1], 0.5 + widths[:, 0] + widths[:, 1] / 2)
    assert out["probs"].shape == (2, 16, 64, 96)
    assert torch.allclose(out["probs"].sum(1), torch.ones(2, 64, 96), atol=1e-5)
    assert (out["depth"] >= 0.5).all() and (out["depth"] <= 8.0).all()


def test_dpm_head_probs_and_log_centres() -> None:
    cfg = ModelConfig(encoder="mobilenetv2_050", head="dpm", min_depth=0.1, max_depth=10.0, num_bins=5)
    model = build_model(cfg).eval()
    x = torch.rand(1, 3, 64, 64)
    out = model.forward_dict(x)
    expected = torch.tensor([0.1, 0.1 * 10 ** 0.5, 1.0, 10 ** 0.5, 10.0])
    assert torch.allclose(out["bin_centers"][0], expected, rtol=1e-5)
    assert torch.allclose(out["probs"].sum(1), torch.ones(1, 64, 64), atol=1e-5)
    manual = (out["probs"] * expected.view(1, 5, 1, 1)).sum(1, keepdim=True)
    assert torch.allclose(out["depth"], manual, rtol=1e-4)
    assert torch.allclose(out["depth"], model(x), rtol=1e-4)  # forward upsamples depth instead
    assert torch.allclose(dpm_centers(1.0, 3.0, 3, "linear"), torch.tensor([1.0, 2.0, 3.0]))
    assert "state_dict" not in out and not any("centers" in k for k in model.state_dict())


def test_forward_dict_features() -> None:
    model = build_model(ModelConfig(encoder="mobilenetv2_050")).eval()
    out = model.forward_dict(torch.rand(1, 3, 64, 96))
    assert [f.shape[-1] for f in out["features"]] == [48, 24, 12, 6, 3]
    assert [f.shape[-1] for f in out["decoder_features"]] == [6, 12, 24, 48]
    assert "probs" not in out


def test_bad_input_sizes() -> None:
    model = build_model(ModelConfig(encoder="mobilenetv2_050"))
    with pytest.raises(ValueError, match="multiple of 32"):
        model(torch.rand(1, 3, 50, 64))
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        model(torch.rand(1, 1, 64, 64))
    vit = build_model(ModelConfig(name="teacher", encoder="vit_small_patch16_224", input_size=(64, 64),
                                  decoder_channels=(32, 16, 16, 16)))
    with pytest.raises(ValueError, match="takes exactly"):
        vit(torch.rand(1, 3, 64, 96))


@pytest.mark.parametrize("kwargs,match", [({"min_depth": 0.0}, "min_depth"),
                                          ({"max_depth": 0.05}, "max_depth"),
                                          ({"num_bins": 1}, "num_bins"),
                                          ({"bin_layout": "cubic"}, "bin_layout"),
                                          ({"input_size": (64, 64, 3)}, "input_size"),
                                          ({"decoder_channels": (32, 0)}, "decoder_channels"),
                                          ({"encoder": "not_a_net"}, "unknown timm encoder")])
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(ModelConfig(**kwargs))


def test_pretrained_local_weights(tmp_path: Path) -> None:
    full = timm.create_model("mobilenetv2_050", pretrained=False)
    good = tmp_path / "mnv2.pth"
    torch.save(full.state_dict(), good)
    model = build_model(ModelConfig(encoder="mobilenetv2_050", pretrained=str(good)))
    assert torch.equal(model.encoder.body.conv_stem.weight, full.conv_stem.weight)
    wrong = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), wrong)
    with pytest.raises(ValueError, match="do not fit encoder 'mobilenetv2_050'"):
        build_model(ModelConfig(encoder="mobilenetv2_050", pretrained=str(wrong)))
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in full.state_dict().items() if not k.startswith("blocks.6")}, partial)
    with pytest.raises(ValueError, match=r"missing keys \['blocks\.6"):
        build_model(ModelConfig(encoder="mobilenetv2_050", pretrained=str(partial)))
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        build_model(ModelConfig(encoder="mobilenetv2_050", pretrained=str(tmp_path / "absent.pth")))


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    cfg = ModelConfig(encoder="mobilenetv2_050", head="dpm", num_bins=8, decoder_channels=(32, 16, 16, 8))
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-default BN stats, so a rebuilt model could not match by luck
        model.encoder.body.bn1.running_mean.uniform_(-0.1, 0.1)
    path = save_checkpoint(tmp_path / "sub" / "m.pt", model, cfg, step=7, note="hi", train={"lr": 1e-3})
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]  # no temp file left
    loaded, cfg2, extra = load_checkpoint(path)
    assert cfg2 == cfg and extra == {"step": 7, "note": "hi", "train": {"lr": 1e-3}}
    x = torch.rand(2, 3, 64, 96)
    assert torch.equal(model(x), loaded.eval()(x))


def test_checkpoint_errors(tmp_path: Path) -> None:
    cfg = ModelConfig(encoder="mobilenetv2_050")
    good = save_checkpoint(tmp_path / "good.pt", build_model(cfg), cfg)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt checkpoint .*truncated.pt"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="corrupt checkpoint .*garbage.pt"):
        load_checkpoint(garbage)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, plain)
    with pytest.raises(ValueError, match="not a depthkd checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "x.pt", build_model(cfg), cfg, state_dict={})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_small_student_param_count_and_onnx_size(tmp_path: Path) -> None:
    """The committed demo student (mobilenetv2_050 + student decoder) stays tiny."""
    ort = pytest.importorskip("onnxruntime")
    model = build_model(ModelConfig(encoder="mobilenetv2_050")).eval()
    params = sum(p.numel() for p in model.parameters())
    assert 400_000 < params < 700_000  # 531,425 with timm 1.0.31
    path = tmp_path / "student.onnx"
    x = torch.rand(1, 3, 96, 128)
    # The TorchScript exporter (dynamo=False) is the quick path for a test.
    torch.onnx.export(model, (x,), str(path), opset_version=17, dynamo=False,
                      input_names=["image"], output_names=["depth"])
    size_mb = path.stat().st_size / 1e6
    assert size_mb < 5.0 and size_mb > params * 4 / 1e6 * 0.9  # fp32 weights dominate
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_depth = session.run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(onnx_depth, model(x).numpy(), rtol=1e-4, atol=1e-5)
