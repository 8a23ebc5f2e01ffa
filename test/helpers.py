"""Helpers shared by test modules (imported as ``helpers``: pytest puts test/ on sys.path)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FASTDEPTH = SHARED / "models" / "fastdepth" / "fast_depth_224.onnx"
TUM = SHARED / "data" / "tum_sample"
REDWOOD = SHARED / "data" / "redwood_sample"


SHARED_FILES = (FASTDEPTH, TUM / "tum_color.png", TUM / "tum_depth.png", REDWOOD)


def require_shared() -> None:
    """Skip (with the one reason every such skip gives) unless ../shared is beside the clone:
    the ``needs_shared`` marker calls it; a module-scoped fixture that reads ../shared too."""
    import pytest

    missing = [str(p) for p in SHARED_FILES if not p.exists()]
    if missing:
        pytest.skip(f"needs_shared: {SHARED} is not beside the clone (missing {', '.join(missing)})")


def ros_domain(base: int) -> int:
    """A ROS_DOMAIN_ID unique to one test module (``base``), shifted by
    DEPTHKD_TEST_DOMAIN_OFFSET so suites run side by side (two checkouts) never cross."""
    domain = base + int(os.environ.get("DEPTHKD_TEST_DOMAIN_OFFSET", "0"))
    if not 0 <= domain <= 232:  # Fast DDS derives ports from it; beyond 232 a node exits silently
        raise ValueError(f"ROS_DOMAIN_ID {domain} out of 0..232: lower DEPTHKD_TEST_DOMAIN_OFFSET")
    return domain


# The smallest widths FastDepthNet accepts (skip additions need equal widths).
TINY_FASTDEPTH = {"encoder_channels": (8,) * 14, "decoder_channels": (8,) * 5}


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "",
               interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


def write_linear_onnx(path: Path, scale: float, offset: float, channel: int = 0,
                      size: tuple[int, int] | None = None) -> Path:
    """A real ONNX depth model: depth = offset + scale * image[:, channel] (a 1x1 conv).

    ``size`` fixes the input (H, W); None leaves both axes dynamic. scale=0 gives
    a constant-depth model; offset=NaN a model whose output is all NaN.
    """
    import onnx
    from onnx import TensorProto, helper

    h, w = size if size is not None else ("H", "W")
    weight = np.zeros((1, 3, 1, 1), dtype=np.float32)
    weight[0, channel] = scale
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["depth"])], "linear_depth",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, h, w])],
        [helper.make_tensor_value_info("depth", TensorProto.FLOAT, [1, 1, h, w])],
        [helper.make_tensor("w", TensorProto.FLOAT, weight.shape, weight.ravel().tolist()),
         helper.make_tensor("b", TensorProto.FLOAT, [1], [offset])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write_bright_nan_onnx(path: Path, threshold: float = 0.5, channel: int = 0) -> Path:
    """A real ONNX depth model finite on black frames, NaN wherever ``channel`` > ``threshold``
    (the one ``depthkd fuzz-node`` tries to hot-swap in)."""
    from depthkd_ros.tools.fuzz_messages import write_bright_nan_onnx as write

    return write(path, threshold, channel)


def write_conv_stack_onnx(path: Path, size: tuple[int, int], channels: int = 32, layers: int = 2,
                          seed: int = 0) -> Path:
    """A seeded ONNX depth model of fixed ``size`` that costs real inference time (3x3 convs
    of ``channels`` at full resolution, ~10 ms at 224x224 here) and whose depth follows the
    image: a synthetic stand-in for a real network where its weights are not the point."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    nodes, inits, x, cin = [], [], "image", 3
    for i in range(layers):
        w = (rng.standard_normal((channels, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
        inits.append(helper.make_tensor(f"w{i}", TensorProto.FLOAT, w.shape, w.ravel().tolist()))
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x, cin = f"r{i}", channels
    w = (4 * np.abs(rng.standard_normal((1, cin, 1, 1))) / cin).astype(np.float32)
    inits += [helper.make_tensor("wout", TensorProto.FLOAT, w.shape, w.ravel().tolist()),
              helper.make_tensor("bout", TensorProto.FLOAT, [1], [1.0])]
    nodes.append(helper.make_node("Conv", [x, "wout", "bout"], ["depth"]))
    graph = helper.make_graph(nodes, "conv_stack_depth",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, *size])],
                              [helper.make_tensor_value_info("depth", TensorProto.FLOAT, [1, 1, *size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def save_tiny_teacher(path: Path) -> Path:
    """A seeded, untrained ResNet-18 U-Net teacher checkpoint (BatchNorm, gradients): the
    small torch teacher the method tests distil from."""
    import torch

    from depthkd_core.models import ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(name="teacher", encoder="resnet18", decoder_channels=(32, 16, 16, 8))
    return save_checkpoint(path, build_model(cfg), cfg)



def save_tiny_fastdepth_onnx(path: Path, seed: int = 0, size: tuple[int, int] = (64, 64)) -> Path:
    """A seeded, untrained FastDepth of the smallest widths, exported to ONNX at ``size``: a
    teacher file of FastDepth's architecture that a student can be initialised from."""
    import torch

    from depthkd_core.export.onnx_export import export_onnx
    from depthkd_core.models import ModelConfig, build_model

    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="fastdepth", **TINY_FASTDEPTH))
    export_onnx(model, path, *size)
    return path
