"""int8 quantisation of an exported student (export/quantize.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import TINY_FASTDEPTH
from torch import nn

from depthkd_core.export.onnx_export import export_onnx
from depthkd_core.export.quantize import INT8_MIN_AGREEMENT, QuantReport, quantize_int8
from depthkd_core.models import build_model
from depthkd_core.runtime import create_session

SIZE = 64


def _images(n: int, seed: int) -> np.ndarray:
    """Smooth random images (blurred noise plus a gradient): activations like a scene's."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((n, 3, 8, 8), dtype=np.float32))
    images = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear")
    ramp = torch.linspace(0, 0.3, SIZE)[None, None, :, None]
    return (0.7 * images + ramp).clamp(0, 1).numpy()


class ImageDepth(nn.Module):
    """Depth that follows the image (0.3-4 m from its brightness through two convs); a
    random FastDepth's depth hardly depends on its input, so clipping would not show."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 16, 1), nn.ReLU())
        self.out = nn.Conv2d(16, 1, 1)
        with torch.no_grad():
            for conv in (self.features[0], self.features[2], self.out):
                conv.weight.abs_()
            x = torch.from_numpy(_images(4, 0))
            self.out.weight.mul_(3.7 / self.out(self.features(x)).amax())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.3 + self.out(self.features(x))


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("int8") / "student.onnx"
    assert export_onnx(ImageDepth().eval(), path, SIZE, SIZE).passed
    return path


def test_int8_graph_is_quantised_close_to_fp32_and_deterministic(fp32: Path, tmp_path: Path) -> None:
    calibration, check = _images(16, 0), _images(4, 1)
    report = quantize_int8(fp32, tmp_path / "a.onnx", calibration, check)
    assert report.passed and report.agree_delta1 >= INT8_MIN_AGREEMENT
    assert report.calibration_images == 16 and report.check_images == 4
    ops = {node.op_type for node in onnx.load(str(tmp_path / "a.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # the I/O contract is the fp32 graph's: float image in, float depth out, any batch
    session, _ = create_session(tmp_path / "a.onnx", "cpu")
    depth = session.run(["depth"], {"image": check})[0]
    reference = create_session(fp32, "cpu")[0].run(["depth"], {"image": check})[0]
    assert depth.dtype == np.float32 and depth.shape == (4, 1, SIZE, SIZE)
    assert np.abs(depth - reference).max() == pytest.approx(report.max_abs, rel=1e-5)
    assert 0 < report.max_abs < 0.1 * reference.max()
    # the same calibration gives the same file
    quantize_int8(fp32, tmp_path / "b.onnx", calibration, check)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_a_calibration_that_clips_the_check_images_fails_the_check(fp32: Path, tmp_path: Path) -> None:
    # ranges fitted on nearly black frames clip every activation a real image gives
    dark = np.full((4, 3, SIZE, SIZE), 0.01, np.float32)
    report = quantize_int8(fp32, tmp_path / "dark.onnx", dark, _images(4, 1))
    assert not report.passed and report.agree_delta1 < INT8_MIN_AGREEMENT


def test_bad_inputs_are_refused_and_nothing_is_written(fp32: Path, tmp_path: Path) -> None:
    good = _images(2, 0)
    out = tmp_path / "x.onnx"
    with pytest.raises(FileNotFoundError, match="not found"):
        quantize_int8(tmp_path / "missing.onnx", out, good, good)
    with pytest.raises(ValueError, match=rf"\(N>=1, 3, {SIZE}, {SIZE}\)"):
        quantize_int8(fp32, out, good[:, :, :32], good)
    with pytest.raises(ValueError, match=r"\(N>=1"):
        quantize_int8(fp32, out, good[:0], good)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        quantize_int8(fp32, out, good * 255, good)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        quantize_int8(fp32, out, good.astype(np.float64), good)
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))


def test_report_criterion_hand_values() -> None:
    report = QuantReport(Path("m.onnx"), 1000, 8, 2, 0.5, 0.02, INT8_MIN_AGREEMENT)
    assert report.passed and "PASS" in report.summary()
    below = QuantReport(Path("m.onnx"), 1000, 8, 2, 0.5, 0.02, INT8_MIN_AGREEMENT - 1e-3)
    assert not below.passed and "FAIL" in below.summary()


def test_cli_exports_fp32_and_int8_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import cv2

    from depthkd_core.cli import main
    from depthkd_core.models import ModelConfig, save_checkpoint

    cfg = ModelConfig(name="fastdepth", decoder_stages=3, **TINY_FASTDEPTH)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "s.pt", build_model(cfg), cfg)
    frames = tmp_path / "transfer"
    frames.mkdir()
    for i, image in enumerate(_images(5, 2)):
        cv2.imwrite(str(frames / f"{i}.png"), (image.transpose(1, 2, 0) * 255).astype(np.uint8))
    out = tmp_path / "onnx" / "student.onnx"
    args = ["export", "--checkpoint", str(ckpt), "--out", str(out), "--height", str(SIZE),
            "--width", str(SIZE), "--int8", str(frames), "--int8-frames", "3"]
    assert main(args) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["student.onnx", "student_fp32.onnx"]
    assert "calibrated on 3 image(s)" in capsys.readouterr().out
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "QuantizeLinear" not in {n.op_type for n in onnx.load(str(out.parent / "student_fp32.onnx")).graph.node}
    assert main([*args, "--fp16"]) == 1
    assert "not with --fp16" in capsys.readouterr().err
