"""FastDepthNet (registry "fastdepth"), its ONNX weight import, and ONNX graphs as torch modules."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import FASTDEPTH, TINY_FASTDEPTH, TUM, save_tiny_fastdepth_onnx
from onnx import TensorProto, helper

from depthkd_core.runtime import OnnxDepthModel
from depthkd_core.models import (MODELS, ModelConfig, OnnxTorchTeacher, build_model, load_checkpoint,
                                 load_teacher, save_checkpoint)
from depthkd_core.models.onnx_torch import fold_weight_dequantize, onnx_to_torch

FASTDEPTH_WIDTHS = {"encoder_channels": (16, 56, 88, 120, 144, 256, 408, 376, 272, 288, 296, 328, 480, 512),
                    "decoder_channels": (200, 256, 120, 56, 16)}


def _tiny(**kwargs) -> torch.nn.Module:
    return build_model(ModelConfig(name="fastdepth", **TINY_FASTDEPTH, **kwargs))


def test_registered_shape_finite_backward() -> None:
    assert "fastdepth" in MODELS.keys()
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="fastdepth"))  # MobileNet v1 1.0 widths
    x = torch.rand(2, 3, 64, 96, requires_grad=True)
    out = model.forward_dict(x)
    assert out["depth"].shape == (2, 1, 64, 96) and torch.isfinite(out["depth"]).all()
    assert [f.shape[1] for f in out["features"]] == list(model.encoder.channels)
    assert (out["depth"] >= model.cfg.min_depth).all() and (out["depth"] <= model.cfg.max_depth).all()
    out["depth"].sum().backward()
    assert x.grad is not None and any(p.grad is not None and p.grad.abs().sum() > 0
                                      for p in model.parameters())


@pytest.mark.parametrize("stages", [5, 2])
def test_any_size_runs_each_upsampled_grid_cropped_to_its_skip(stages: int, tmp_path: Path) -> None:
    # 50 and 70 round up at every stride-2 conv (50 -> 25 -> 13 -> 7 -> 4 -> 2), so a
    # doubled grid is a cell longer than the skip it is added to
    from depthkd_core.export.onnx_export import export_onnx

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="fastdepth", **TINY_FASTDEPTH, decoder_stages=stages)).eval()
    out = model.forward_dict(torch.rand(1, 3, 50, 70))
    assert out["depth"].shape == (1, 1, 50, 70) and torch.isfinite(out["depth"]).all()
    grids = [tuple(out["features"][b].shape[-2:]) for b in (11, 5, 3, 1)][:stages]
    assert [tuple(d.shape[-2:]) for d in out["decoder_features"]][:4] == grids
    assert export_onnx(model, tmp_path / "odd.onnx", 50, 70).passed  # the crops export too


def test_width_and_size_errors() -> None:
    with pytest.raises(ValueError, match="is added to encoder block"):
        build_model(ModelConfig(name="fastdepth", encoder_channels=(8,) * 14,
                                decoder_channels=(8, 16, 8, 8, 8)))
    with pytest.raises(ValueError, match="14 encoder_channels"):
        build_model(ModelConfig(name="fastdepth", encoder_channels=(8,) * 3))
    with pytest.raises(ValueError, match="below 32"):
        _tiny()(torch.rand(1, 3, 24, 64))
    with pytest.raises(ValueError, match="decoder_stages must be in 1..5"):
        ModelConfig(name="fastdepth", decoder_stages=0)
    with pytest.raises(ValueError, match="decoder_stages is a fastdepth option"):
        ModelConfig(name="student", decoder_stages=3)
    with pytest.raises(ValueError, match="needs its new output conv fitted"):
        build_model(ModelConfig(name="fastdepth", **FASTDEPTH_WIDTHS, decoder_stages=2,
                                pretrained=str(FASTDEPTH)))


def test_input_size_runs_at_its_size_and_answers_at_the_callers() -> None:
    torch.manual_seed(0)
    model = _tiny(input_size=(32, 64)).eval()
    seen = []
    model.encoder.layers[0].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
    x = torch.rand(1, 3, 96, 192)
    assert model(x).shape == (1, 1, 96, 192) and seen == [(32, 64)]
    small = torch.nn.functional.interpolate(x, size=(32, 64), mode="bilinear", antialias=True,
                                            align_corners=False)
    assert torch.allclose(model.forward_dict(small)["depth"],
                          torch.nn.functional.interpolate(model(x), size=(32, 64), mode="bilinear",
                                                          align_corners=False, antialias=True),
                          atol=0.05)


def test_onnx_import_round_trip_and_checkpoint(tmp_path: Path) -> None:
    path = save_tiny_fastdepth_onnx(tmp_path / "tiny.onnx", seed=3)
    imported = _tiny(pretrained=str(path)).eval()
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    onnx_depth = OnnxDepthModel(path, "cpu").predict_batch(x)
    torch_depth = imported(torch.from_numpy(x)).detach().numpy()
    assert np.abs(onnx_depth - torch_depth).max() < 1e-5
    assert not torch.allclose(_tiny()(torch.from_numpy(x)), torch.from_numpy(torch_depth))
    # a checkpoint rebuilds without the ONNX file
    ckpt = save_checkpoint(tmp_path / "s.pt", imported, imported.cfg)
    path.unlink()
    reloaded, cfg, _ = load_checkpoint(ckpt)
    assert cfg.name == "fastdepth" and torch.equal(reloaded.eval()(torch.from_numpy(x)),
                                                   imported(torch.from_numpy(x)))


def test_onnx_import_refuses_other_widths(tmp_path: Path) -> None:
    path = save_tiny_fastdepth_onnx(tmp_path / "tiny.onnx")
    with pytest.raises(ValueError, match=r"output channels \[8, 8"):
        build_model(ModelConfig(name="fastdepth", pretrained=str(path)))
    with pytest.raises(FileNotFoundError):
        _tiny(pretrained=str(tmp_path / "missing.onnx"))


def _dequantize_conv_graph(path: Path, rng: np.random.Generator) -> tuple[Path, np.ndarray]:
    """Conv whose int8 weights go through a per-channel DequantizeLinear (axis 0)."""
    q = rng.integers(-127, 127, size=(2, 3, 1, 1)).astype(np.int8)
    scale = np.array([0.01, 0.03], np.float32)
    zero = np.array([3, -2], np.int8)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=0),
         helper.make_node("Conv", ["image", "w"], ["depth"])], "dq",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("depth", TensorProto.FLOAT, [1, 2, 8, 8])],
        [helper.make_tensor("q", TensorProto.INT8, q.shape, q.ravel().tolist()),
         helper.make_tensor("s", TensorProto.FLOAT, [2], scale.tolist()),
         helper.make_tensor("z", TensorProto.INT8, [2], zero.tolist())])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(path))
    expected = (q.astype(np.float32) - zero.reshape(2, 1, 1, 1)) * scale.reshape(2, 1, 1, 1)
    return path, expected


def test_dequantize_folding_matches_onnx_runtime(tmp_path: Path) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    path, expected = _dequantize_conv_graph(tmp_path / "dq.onnx", rng)
    folded = fold_weight_dequantize(onnx.load(str(path)))
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    weight = next(i for i in folded.graph.initializer if i.name == "w")
    assert np.array_equal(onnx.numpy_helper.to_array(weight), expected)
    x = rng.random((1, 3, 8, 8), dtype=np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    got = onnx_to_torch(path)(torch.from_numpy(x)).detach().numpy()
    assert np.abs(want - got).max() < 1e-5


def _tum_frame() -> np.ndarray:
    import cv2

    rgb = cv2.cvtColor(cv2.imread(str(TUM / "tum_color.png")), cv2.COLOR_BGR2RGB)
    rgb = cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_AREA)
    return (rgb.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]


@pytest.mark.needs_shared
def test_fastdepth_as_torch_matches_onnx_runtime_on_a_real_frame_with_gradients() -> None:
    x = _tum_frame()
    runtime = OnnxDepthModel(FASTDEPTH, "cpu").predict_batch(x)
    teacher = load_teacher(FASTDEPTH, differentiable=True)
    assert isinstance(teacher, OnnxTorchTeacher) and teacher.input_size == (224, 224)
    image = torch.from_numpy(x).requires_grad_(True)
    depth = teacher(image)
    # measured: 3.8e-6 m on the TUM frame (depth ~1-4 m)
    assert np.abs(depth.detach().numpy() - runtime).max() < 1e-4
    depth.mean().backward()
    assert image.grad is not None and float(image.grad.abs().sum()) > 0
    assert all(not p.requires_grad for p in teacher.module.parameters())


@pytest.mark.needs_shared
def test_fastdepth_weights_import_into_the_student_architecture() -> None:
    x = _tum_frame()
    runtime = OnnxDepthModel(FASTDEPTH, "cpu").predict_batch(x)
    model = build_model(ModelConfig(name="fastdepth", pretrained=str(FASTDEPTH), **FASTDEPTH_WIDTHS))
    depth = model.eval()(torch.from_numpy(x)).detach().numpy()
    assert np.abs(depth - np.clip(runtime, 0.1, 10.0)).max() < 1e-4
    assert sum(p.numel() for p in model.parameters()) == 1_352_225


def test_export_fuses_each_activation_and_upsamples_depth_last(tmp_path: Path) -> None:
    """Each capped ReLU exports as one Clip with constant bounds (ONNX Runtime fuses it into
    the conv; a separate Min broke its blocked layout), and the output conv runs before the
    last x2 upsampling, which gives the same depth as after it."""
    import torch.nn.functional as F

    from depthkd_core.export.onnx_export import export_onnx

    torch.manual_seed(0)
    model = _tiny().eval()
    x = torch.rand(2, 3, 64, 64)
    out = model.forward_dict(x)
    last = out["decoder_features"][-1]
    assert last.shape[-1] == 32  # the last stage's features, at half the input size
    upsampled = F.interpolate(last, scale_factor=2.0, mode="nearest")
    reference = model.out_act(model.out(upsampled)).clamp_min(model.cfg.min_depth)
    torch.testing.assert_close(out["depth"], reference, rtol=0, atol=0)
    path = tmp_path / "fd.onnx"
    assert export_onnx(model, path, 64, 64).passed
    graph = onnx.load(str(path)).graph
    ops = [node.op_type for node in graph.node]
    # one per conv, per skip addition, the input's [0, 1] and the output's min_depth
    assert "Min" not in ops and ops.count("Clip") == len(model.convs_and_caps()[1]) + 3 + 2
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                     for o in n.output}
    for node in graph.node:
        if node.op_type == "Clip":
            assert all(name in constants for name in node.input[1:] if name), node.name


def test_a_cut_decoder_upsamples_its_coarse_depth_bilinearly_and_exports(tmp_path: Path) -> None:
    """With decoder_stages=2 the output conv reads stage 2's features (after its x2 and skip,
    stride 8) and the depth is that grid bilinearly upsampled; the graph exports with parity."""
    import torch.nn.functional as F

    from depthkd_core.export.onnx_export import export_onnx

    torch.manual_seed(0)
    model = _tiny(decoder_stages=2).eval()
    x = torch.rand(2, 3, 64, 96)
    out = model.forward_dict(x)
    last = out["decoder_features"][-1]
    assert len(out["decoder_features"]) == 2 and last.shape[-2:] == (8, 12)
    coarse = model.out_act(model.out(last))
    reference = F.interpolate(coarse, size=(64, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["depth"], reference.clamp_min(model.cfg.min_depth), rtol=0, atol=0)
    path = tmp_path / "cut.onnx"
    assert export_onnx(model, path, 64, 96).passed
    assert "Resize" in [node.op_type for node in onnx.load(str(path)).graph.node]


def test_scale_head_starts_as_the_imported_weights_then_scales_each_image(tmp_path: Path) -> None:
    """The global scale head multiplies each image's depth by one factor read from the whole
    image: it starts at exactly 1 (an imported teacher computes what it did), learns, and
    exports with parity."""
    from depthkd_core.export.onnx_export import export_onnx

    path = save_tiny_fastdepth_onnx(tmp_path / "tiny.onnx", seed=3)
    plain, headed = _tiny(pretrained=str(path)).eval(), _tiny(pretrained=str(path), scale_head=8).eval()
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(headed(x), plain(x), rtol=0, atol=0)
    with torch.no_grad():
        headed.scale.mlp[-1].bias.fill_(math.log(1.5))
    # one factor per image, applied before the output cap (depth stays within range)
    raw = plain.out(plain.forward_dict(x)["decoder_features"][-1])
    scaled = headed.forward_dict(x)["depth"]
    expected = torch.nn.functional.interpolate(plain.out_act(raw * 1.5), scale_factor=2.0)
    torch.testing.assert_close(scaled, expected.clamp_min(plain.cfg.min_depth))
    assert scaled.max() <= plain.cfg.max_depth
    # the head learns from the depth loss: its zero last layer at once, its first layer as
    # soon as the last is non-zero
    headed.train()
    headed(x).mean().backward()
    assert headed.scale.mlp[-1].weight.grad.abs().sum() > 0
    assert headed.scale.mlp[0].weight.grad.abs().sum() == 0
    with torch.no_grad():
        headed.scale.mlp[-1].weight.fill_(0.01)
    headed.zero_grad()
    headed(x).mean().backward()
    assert headed.scale.mlp[0].weight.grad.abs().sum() > 0
    assert export_onnx(headed.eval(), tmp_path / "headed.onnx", 64, 64).passed
    with pytest.raises(ValueError, match="scale_head must be >= 0"):
        ModelConfig(name="fastdepth", scale_head=-1)
    with pytest.raises(ValueError, match="fastdepth option"):
        ModelConfig(name="student", scale_head=8)
