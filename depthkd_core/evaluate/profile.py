"""Model cost: parameters, multiply-accumulates (torch modules and ONNX files) and CPU/GPU latency."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not), shared tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def _device_dtype(model: object) -> tuple[torch.device, torch.dtype]:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 4 or min(shape) <= 0:
        raise ValueError(f"input_shape must be (B, C, H, W) with positive sizes, got {input_shape}")
    return shape


@contextmanager
def eval_mode(model: object) -> Iterator[None]:
    """Eval mode for the duration (BatchNorm/dropout as at inference), then restore."""
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def count_macs(model: nn.Module, input_shape: Sequence[int] = (1, 3, 224, 224)) -> int:
    """Multiply-accumulates of one forward pass: ``FlopCounterMode`` FLOPs / 2.

    Counts matmuls and convolutions (what papers report as MACs); elementwise
    ops, norms and bias additions are not counted.
    """
    shape = _check_shape(input_shape)
    device, dtype = _device_dtype(model)
    x = torch.zeros(shape, device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.inference_mode(), counter:
        model(x)
    return counter.get_total_flops() // 2


def measure_latency(model: Callable[[torch.Tensor], object], input_shape: Sequence[int],
                    warmup: int = 3, runs: int = 10) -> dict[str, float]:
    """Wall-clock milliseconds per forward pass: ``mean_ms``, ``median_ms``, ``p90_ms``.

    ``model`` is an ``nn.Module`` or any callable on a (B,3,H,W) tensor (e.g. a
    ``Teacher`` wrapping ONNX Runtime); it runs in eval mode under ``inference_mode``.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    shape = _check_shape(input_shape)
    device, dtype = _device_dtype(model)
    x = torch.rand(shape, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with eval_mode(model), torch.inference_mode():
        for i in range(warmup + runs):
            sync()
            start = time.perf_counter()
            model(x)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    ms = np.asarray(times)
    return {"mean_ms": float(ms.mean()), "median_ms": float(np.median(ms)),
            "p90_ms": float(np.percentile(ms, 90))}


def _shape(value_info: object) -> list[int] | None:
    dims = value_info.type.tensor_type.shape.dim
    values = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return None if not values or None in values else values


def onnx_cost(path: str | Path, input_shape: Sequence[int]) -> tuple[int, int | None]:
    """(parameters, MACs) of an ONNX model at ``input_shape``, counted as ``count_macs``
    counts a torch module: Conv, ConvTranspose, MatMul and Gemm (elementwise ops, norms and
    biases are not). Parameters: the weight tensors (float, or int8/uint8 when quantized). MACs are None when shape
    inference cannot resolve every counted node (a graph with data-dependent shapes).
    Exported graphs fold BatchNorm into the convolutions, so they hold fewer parameters
    than the torch module they came from (and a few float constants, e.g. resize scales,
    count as weights); the MACs are the same."""
    import onnx
    from onnx import numpy_helper, shape_inference

    shape = _check_shape(input_shape)
    model = onnx.load(str(path))
    graph = model.graph
    # float weights, and int8/uint8 ones of quantized graphs (their per-channel scales
    # count too, a fraction of a percent)
    weights = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
               onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    # weights are initializers, or Constant nodes in some exporters' graphs (scalars are not)
    tensors = [*graph.initializer, *(a.t for n in graph.node if n.op_type == "Constant"
                                      for a in n.attribute if a.name == "value")]
    params = sum(int(np.prod(t.dims)) for t in tensors if t.data_type in weights and t.dims)
    initializers = {t.name for t in graph.initializer}
    image = next(i for i in graph.input if i.name not in initializers)
    for dim, value in zip(image.type.tensor_type.shape.dim, shape):
        dim.ClearField("dim_param")
        dim.dim_value = value
    inferred = shape_inference.infer_shapes(model, data_prop=True).graph
    shapes = {v.name: _shape(v) for v in [*inferred.input, *inferred.value_info, *inferred.output]}
    shapes.update({t.name: list(t.dims) for t in graph.initializer})
    shapes.update({n.output[0]: list(numpy_helper.to_array(a.t).shape)
                   for n in inferred.node if n.op_type == "Constant" for a in n.attribute
                   if a.name == "value"})
    macs = 0
    for node in inferred.node:
        if node.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            continue
        a, b, out = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
        if a is None or b is None or out is None:
            return params, None
        if node.op_type == "Conv":          # weight (Cout, Cin/g, kh, kw): per output element
            macs += int(np.prod(out)) * int(np.prod(b[1:]))
        elif node.op_type == "ConvTranspose":  # weight (Cin, Cout/g, kh, kw): per input element
            macs += int(np.prod(a)) * int(np.prod(b[1:]))
        elif node.op_type == "MatMul":
            macs += int(np.prod(out)) * a[-1]
        else:
            trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
            macs += int(np.prod(out)) * (a[0] if trans_a else a[-1])
    return params, macs
