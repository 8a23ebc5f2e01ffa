"""ONNX export: graph contract, dynamic batch, PyTorch parity (fp32 and fp16), CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from torch import nn

from depthkd_core.cli import main
from depthkd_core.export.onnx_export import FP32_TOLERANCE, ParityReport, export_onnx
from depthkd_core.runtime import OnnxDepthModel, create_session
from depthkd_core.models import ModelConfig, build_model, save_checkpoint

from helpers import TUM

TUM_COLOR = TUM / "tum_color.png"
H, W = 64, 96


@pytest.fixture(scope="module")
def student() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(encoder="mobilenetv2_050")).eval()


def io_dims(path: Path) -> dict[str, list]:
    proto = onnx.load(str(path))
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*proto.graph.input, *proto.graph.output)}


@pytest.mark.needs_shared
def test_cli_export_fp32_parity_and_dynamic_batch(student: nn.Module, tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "s.pt", student, ModelConfig(encoder="mobilenetv2_050"))
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(TUM_COLOR, images / "tum_color.png")
    out = tmp_path / "onnx" / "student.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--height", str(H),
                 "--width", str(W), "--check-images", str(images)]) == 0
    assert io_dims(out) == {"image": ["batch", 3, H, W], "depth": ["batch", 1, H, W]}
    assert [p.name for p in out.parent.iterdir()] == ["student.onnx"]  # no temp file left

    # independent check: batch 3 of real + random images through ORT vs PyTorch
    rgb = cv2.resize(cv2.cvtColor(cv2.imread(str(TUM_COLOR)), cv2.COLOR_BGR2RGB), (W, H),
                     interpolation=cv2.INTER_AREA)
    x = np.concatenate([rgb.transpose(2, 0, 1)[None].astype(np.float32) / 255,
                        np.random.default_rng(1).random((2, 3, H, W), dtype=np.float32)])
    session, _ = create_session(out, "cpu")
    got = session.run(["depth"], {"image": x})[0]
    with torch.no_grad():
        ref = student(torch.from_numpy(x)).numpy()
    assert got.shape == (3, 1, H, W)
    assert np.abs(got - ref).max() / np.abs(ref).max() < FP32_TOLERANCE
    # the runtime the live node uses reads it too
    depth = OnnxDepthModel(out, providers="cpu").predict(rgb)
    assert depth.shape == (H, W) and np.allclose(depth, ref[0, 0], rtol=1e-4, atol=1e-5)


class SmallDepthNet(nn.Module):
    """Conv/BN/ReLU encoder-decoder with bilinear upsampling: DepthNet's op mix, fast to export."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16),
                                  nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.out = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        depth = nn.functional.softplus(self.out(self.down(x))) + 0.1
        return nn.functional.interpolate(depth, size=x.shape[-2:], mode="bilinear")


def test_fp16_export_is_half_precision_inside(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SmallDepthNet().eval()
    images = [np.random.default_rng(2).integers(0, 256, (120, 160, 3), dtype=np.uint8)]
    report = export_onnx(model, tmp_path / "s16.onnx", H, W, fp16=True, check_images=images)
    assert report.fp16 and report.passed and report.num_real == 1
    assert 0 < report.max_rel <= 1e-2 and report.max_abs == max(report.random_max_abs,
                                                                 report.real_max_abs)
    proto = onnx.load(str(report.path))
    weight_types = {init.data_type for init in proto.graph.initializer if len(init.dims) == 4}
    assert weight_types == {onnx.TensorProto.FLOAT16}  # conv weights stored in half
    assert io_dims(report.path)["image"] == ["batch", 3, H, W]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert report.size_bytes == report.path.stat().st_size


class ExportsDifferently(nn.Module):
    """Adds 1e-3 m only while being exported, so parity must fail."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        depth = 1.0 + x.mean(dim=1, keepdim=True)
        return depth + 1e-3 if torch.compiler.is_exporting() else depth


def test_parity_failure_is_reported(tmp_path: Path) -> None:
    report = export_onnx(ExportsDifferently(), tmp_path / "bad.onnx", 32, 32, dynamic_batch=False)
    assert io_dims(report.path) == {"image": [1, 3, 32, 32], "depth": [1, 1, 32, 32]}
    assert report.random_max_abs == pytest.approx(1e-3, rel=1e-3)
    # depth in [1, 2]: relative error = 1e-3 / max depth
    assert 1e-3 / 2 < report.max_rel < 1e-3 and not report.passed
    assert "parity FAIL" in report.summary()


def test_report_criterion_hand_values() -> None:
    common = dict(path=Path("m.onnx"), size_bytes=1, random_max_abs=0.0, random_max_rel=0.0,
                  real_max_abs=None, real_max_rel=None, num_real=0, provider="cpu")
    assert ParityReport(max_abs=1e-4, max_rel=1e-4, fp16=False, **common).passed
    assert not ParityReport(max_abs=1e-4, max_rel=1.01e-4, fp16=False, **common).passed
    assert ParityReport(max_abs=1e-4, max_rel=5e-3, fp16=True, **common).passed


def test_bad_arguments() -> None:
    model = ExportsDifferently()
    with pytest.raises(ValueError, match="opset must be >= 17"):
        export_onnx(model, "x.onnx", 32, 32, opset=13)
    with pytest.raises(ValueError, match="image 0 must be uint8"):
        export_onnx(model, "x.onnx", 32, 32, check_images=[np.zeros((4, 4), np.float32)])
