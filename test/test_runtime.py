"""runtime: provider choice, errors, OnnxDepthModel on real and built models."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from depthkd_core.imaging import resize_rgb, rgb_to_chw
from depthkd_core.runtime import OnnxDepthModel, create_session

REPO = Path(__file__).resolve().parents[1]
from helpers import FASTDEPTH, TUM, write_linear_onnx

TUM_RGB = TUM / "tum_color.png"


def _mean_model(path: Path, keepdims: bool, height=None, width=None) -> Path:
    """depth = 2 * mean_c(image) + 1 on a (B,3,H,W) input; H, W dynamic unless given."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", 3, height or "H", width or "W"])
    out_shape = ["B", 1, height or "H", width or "W"] if keepdims else ["B", height or "H", width or "W"]
    depth = helper.make_tensor_value_info("depth", TensorProto.FLOAT, out_shape)
    nodes = [helper.make_node("ReduceMean", ["image"], ["m"], axes=[1], keepdims=int(keepdims)),
             helper.make_node("Mul", ["m", "two"], ["m2"]),
             helper.make_node("Add", ["m2", "one"], ["depth"])]
    consts = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
              helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])]
    graph = helper.make_graph(nodes, "mean_depth", [image], [depth], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_auto_picks_cpu_here_and_logs(caplog, tmp_path: Path) -> None:
    model = write_linear_onnx(tmp_path / "linear.onnx", 1.0, 0.5)
    with caplog.at_level(logging.INFO, logger="depthkd_core.runtime"):
        session, provider = create_session(model, "auto", intra_op_num_threads=1)
    assert provider == "CPUExecutionProvider"
    assert session.get_providers()[0] == provider
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == \
        ["ONNX Runtime runs linear.onnx on CPUExecutionProvider"]


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_explicit_gpu_unusable_raises(provider: str, tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA build of onnxruntime is installed")
    with pytest.raises(ValueError, match=f"provider '{provider}' unusable .*not in this onnxruntime build"):
        create_session(write_linear_onnx(tmp_path / "linear.onnx", 1.0, 0.5), provider)


def test_session_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.onnx"):
        create_session(tmp_path / "absent.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(ValueError, match="not a valid ONNX model .*garbage.onnx"):
        create_session(garbage)
    good = _mean_model(tmp_path / "m.onnx", keepdims=True)
    with pytest.raises(ValueError, match="providers must be"):
        create_session(good, "gpu")
    with pytest.raises(ValueError, match="intra_op_num_threads"):
        create_session(good, "cpu", intra_op_num_threads=0)


def test_rgb_to_chw_is_every_network_input() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    rgb[0, 0] = (0, 128, 255)
    x = rgb_to_chw(rgb)
    assert x.shape == (3, 5, 7) and x.dtype == np.float32 and x.flags.c_contiguous
    assert x[:, 0, 0].tolist() == [0.0, np.float32(128) * np.float32(1 / 255), 1.0]
    np.testing.assert_allclose(x, rgb.transpose(2, 0, 1) / 255.0, rtol=1e-6)


@pytest.mark.needs_shared
def test_fastdepth_predict_real_frame() -> None:
    model = OnnxDepthModel(FASTDEPTH, providers="cpu")
    assert model.input_size == (224, 224) and model.provider == "CPUExecutionProvider"
    rgb = cv2.cvtColor(cv2.imread(str(TUM_RGB)), cv2.COLOR_BGR2RGB)
    depth = model.predict(rgb)
    assert depth.shape == (224, 224) and depth.dtype == np.float32
    assert 0.5 < float(np.median(depth)) < 5.0
    # A batch-1 model still serves batches (one run per image), same numbers.
    x = resize_rgb(rgb, 224, 224).astype(np.float32) / 255.0
    batch = np.stack([x.transpose(2, 0, 1), x[::-1].transpose(2, 0, 1)])
    out = model.predict_batch(batch)
    assert out.shape == (2, 1, 224, 224)
    np.testing.assert_allclose(out[0, 0], depth, atol=1e-5)
    with pytest.raises(ValueError, match=r"takes \(224, 224\) images, got \(240, 320\)"):
        model.predict_batch(np.zeros((1, 3, 240, 320), np.float32))
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        model.predict(rgb.astype(np.float32))


@pytest.mark.parametrize("keepdims", [True, False])
def test_dynamic_model_output_ranks(tmp_path: Path, keepdims: bool) -> None:
    model = OnnxDepthModel(_mean_model(tmp_path / "m.onnx", keepdims), providers="cpu")
    assert model.input_size is None
    x = np.random.default_rng(1).random((2, 3, 40, 56), dtype=np.float32)
    out = model.predict_batch(x)
    assert out.shape == (2, 1, 40, 56)
    np.testing.assert_allclose(out[:, 0], 2 * x.mean(axis=1) + 1, rtol=1e-6)
    rgb = np.full((50, 70, 3), 51, np.uint8)  # 0.2 everywhere -> depth 1.4
    depth = model.predict(rgb)
    assert depth.shape == (64, 64)  # snapped to multiples of 32 for dynamic models
    np.testing.assert_allclose(depth, 1.4, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        model.predict_batch(np.zeros((3, 40, 56), np.float32))


def test_fixed_size_model_predict_resizes(tmp_path: Path) -> None:
    model = OnnxDepthModel(_mean_model(tmp_path / "f.onnx", True, 32, 48), providers="auto")
    assert model.input_size == (32, 48)
    depth = model.predict(np.zeros((480, 640, 3), np.uint8))
    assert depth.shape == (32, 48)
    np.testing.assert_allclose(depth, 1.0)


def test_worker_threads_do_not_spin(tmp_path: Path) -> None:
    """Busy-waiting ORT threads take the CPU the live node's executor and DDS need."""
    model = OnnxDepthModel(_mean_model(tmp_path / "m.onnx", keepdims=True), providers="cpu")
    options = model.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
