"""Teachers: depthkd checkpoint, TorchScript, ONNX (real FastDepth), Hugging Face, cache."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from depthkd_core.models import (CachedTeacher, CheckpointTeacher, HuggingFaceTeacher, ModelConfig,
                                 OnnxTeacher, Teacher, TorchScriptTeacher, build_model, load_teacher,
                                 save_checkpoint)
from helpers import FASTDEPTH, TUM


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, ModelConfig]:
    torch.manual_seed(0)
    cfg = ModelConfig(encoder="mobilenetv2_050", decoder_channels=(32, 16, 16, 8))
    return build_model(cfg).eval(), cfg


def test_checkpoint_teacher(tmp_path: Path, tiny) -> None:
    model, cfg = tiny
    path = save_checkpoint(tmp_path / "t.pt", model, cfg)
    teacher = load_teacher(path)
    assert isinstance(teacher, CheckpointTeacher)
    assert teacher.is_metric and teacher.differentiable and teacher.module is not None
    assert not teacher.module.training
    assert not any(p.requires_grad for p in teacher.module.parameters())
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(teacher(x), model(x))
        # Not a multiple of 32: resized to the nearest one and back to the input size.
        assert teacher(torch.rand(1, 3, 50, 70)).shape == (1, 1, 50, 70)
    x.requires_grad_(True)
    teacher(x).sum().backward()  # DFAD needs gradients w.r.t. the image
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory, tiny) -> Path:
    """The tiny model traced at 64x64 and saved as a TorchScript archive."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.trace(tiny[0], torch.rand(1, 3, 64, 64))
    path = tmp_path_factory.mktemp("ts") / "traced.pt"
    module.save(str(path))
    return path


def test_torchscript_teacher(traced: Path, tiny) -> None:
    model, path = tiny[0], traced
    teacher = load_teacher(path)
    assert isinstance(teacher, TorchScriptTeacher) and teacher.is_metric
    x = torch.rand(2, 3, 96, 128)  # traced at 64x64: sizes follow the input
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), model(x), rtol=1e-5, atol=1e-5)
    assert not load_teacher(path, is_metric=False).is_metric


@pytest.fixture(scope="module")
def tum_frame() -> tuple[np.ndarray, np.ndarray]:
    rgb = cv2.cvtColor(cv2.imread(str(TUM / "tum_color.png")), cv2.COLOR_BGR2RGB)
    depth = cv2.imread(str(TUM / "tum_depth.png"), cv2.IMREAD_UNCHANGED).astype(np.float32) / 5000.0
    return rgb, depth


@pytest.mark.needs_shared
def test_onnx_teacher_fastdepth_on_real_frame(tum_frame) -> None:
    rgb, gt = tum_frame
    teacher = load_teacher(FASTDEPTH)
    assert isinstance(teacher, OnnxTeacher)
    assert teacher.is_metric and not teacher.differentiable and teacher.module is None
    assert teacher.input_size == (224, 224)
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    image.requires_grad_(True)
    depth = teacher(image)
    assert depth.shape == (1, 1, 480, 640) and not depth.requires_grad
    pred = depth[0, 0].numpy()
    valid = gt > 0
    assert 0.5 < float(np.median(pred)) < 5.0
    abs_rel = float(np.mean(np.abs(pred[valid] - gt[valid]) / gt[valid]))
    assert abs_rel < 0.5, abs_rel  # FastDepth (NYU) on a TUM office frame: about 0.3


def _tiny_depth_anything(folder: Path, metric: bool) -> None:
    from transformers import (
        AutoModelForDepthEstimation,
        DepthAnythingConfig,
        Dinov2Config,
        DPTImageProcessor,
    )

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=64, image_size=56, patch_size=14,
                            out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    extra = {"depth_estimation_type": "metric", "max_depth": 10} if metric else {}
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32,
                                 fusion_hidden_size=16, neck_hidden_sizes=[16, 16, 16, 16],
                                 head_hidden_size=16, **extra)
    torch.manual_seed(0)
    AutoModelForDepthEstimation.from_config(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)


@pytest.mark.parametrize("metric", [False, True])
def test_huggingface_teacher(tmp_path: Path, metric: bool) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoImageProcessor

    _tiny_depth_anything(tmp_path, metric)
    teacher = load_teacher(tmp_path)
    assert isinstance(teacher, HuggingFaceTeacher)
    assert teacher.is_metric is metric and teacher.is_inverse is (not metric)
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    processed = AutoImageProcessor.from_pretrained(tmp_path)(images=image, return_tensors="pt")
    assert teacher._model_size(48, 64) == tuple(processed["pixel_values"].shape[-2:])
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        depth = teacher(x)
        raw = teacher.module(pixel_values=processed["pixel_values"]).predicted_depth
    assert depth.shape == (1, 1, 48, 64) and torch.isfinite(depth).all()
    # Our torch preprocessing (bilinear) vs the processor's (bicubic): same depth scale.
    assert abs(float(depth.mean()) - float(raw.mean())) < 0.05 * float(raw.abs().mean()) + 1e-3


class CountingTeacher(Teacher):
    name = "counting"
    differentiable = False

    def __init__(self) -> None:
        self.calls = 0
        self.images_seen = 0

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images_seen += images.shape[0]
        return images.mean(dim=1, keepdim=True) * 4.0 + 0.5


def test_cached_teacher(tmp_path: Path) -> None:
    inner = CountingTeacher()
    cached = CachedTeacher(inner, tmp_path / "cache")
    a, b = torch.rand(2, 3, 32, 32), torch.rand(1, 3, 32, 32)
    first = cached(a)
    assert inner.calls == 1 and len(list((tmp_path / "cache").glob("*.npy"))) == 2
    assert torch.equal(cached(a), first) and inner.calls == 1
    mixed = cached(torch.cat([a[1:], b]))  # one hit, one miss
    assert inner.calls == 2 and inner.images_seen == 3
    torch.testing.assert_close(mixed[0], first[1])
    torch.testing.assert_close(mixed[1], b.mean(1) * 4.0 + 0.5)
    assert (cached.hits, cached.misses) == (3, 3)
    fresh = CachedTeacher(CountingTeacher(), tmp_path / "cache")  # persists on disk
    fresh(a)
    assert fresh.teacher.calls == 0
    assert not list((tmp_path / "cache").glob(".*"))  # no temp files left


def test_load_teacher_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.onnx"):
        load_teacher(tmp_path / "nothing.onnx")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80not a checkpoint" * 50)
    with pytest.raises(ValueError, match=r"cannot load teacher .*garbage.pt.*TorchScript"):
        load_teacher(garbage)
    bad_onnx = tmp_path / "bad.onnx"
    bad_onnx.write_bytes(b"garbage" * 20)
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        load_teacher(bad_onnx)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_teacher(tmp_path / "folder")
    with pytest.raises(ValueError, match=r"expects float images \(B,3,H,W\)"):
        CountingTeacher()(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="output must be one of"):
        load_teacher(garbage, output="disparity")


def test_teacher_output_for_files_that_cannot_say(tmp_path: Path, tiny, traced: Path) -> None:
    model, cfg = tiny
    path = traced
    auto, relative = load_teacher(path), load_teacher(path, output="relative_inverse")
    assert (auto.is_metric, auto.is_inverse) == (True, False)
    assert (relative.is_metric, relative.is_inverse) == (False, True)
    plain = load_teacher(path, output="relative")
    assert (plain.is_metric, plain.is_inverse) == (False, False)
    # a checkpoint knows it is metric: a contradicting output is refused, not ignored
    ckpt = save_checkpoint(tmp_path / "t.pt", model, cfg)
    with pytest.raises(ValueError, match="applies to ONNX/TorchScript files only"):
        load_teacher(ckpt, output="relative_inverse")
