"""ONNX graphs as differentiable torch modules (onnx2torch), for methods that need
gradients through an ONNX teacher (``dfad``; any input-space search).

onnx2torch has no converter for ``DequantizeLinear``, which int8-weight exports
(FastDepth's, most TFLite -> ONNX conversions) put in front of every weight. Those
nodes only dequantise constants, so they are evaluated here with numpy
(``(q - zero_point) * scale`` along ``axis``) and replaced by float initializers
before conversion; a DequantizeLinear of a run-time tensor (activation
quantisation) is refused with its name. BatchNorm folded into convs stays folded:
the converted module has no running statistics (so ``datafree`` with G still cannot
use it; docs/distill.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int) -> np.ndarray:
    shape = [1] * q.ndim
    if scale.ndim == 1 and scale.size > 1:
        shape[axis % q.ndim] = scale.size
    zero_f = np.zeros(1, np.float32) if zero is None else zero.astype(np.float32).reshape(shape)
    return ((q.astype(np.float32) - zero_f) * scale.astype(np.float32).reshape(shape)).astype(np.float32)


def constant_values(graph) -> dict[str, np.ndarray]:
    """Every constant of ``graph`` by name: initializers, Constant nodes and the outputs of
    DequantizeLinear nodes whose inputs are all constants (evaluated)."""
    from onnx import helper, numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "DequantizeLinear" and all(i in values for i in node.input if i):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            zero = values[node.input[2]] if len(node.input) > 2 and node.input[2] else None
            values[node.output[0]] = _dequantize(values[node.input[0]], values[node.input[1]],
                                                 zero, int(attrs.get("axis", 1)))
    return values


def fold_weight_dequantize(model):
    """A copy of ``model`` (onnx.ModelProto) with constant DequantizeLinear nodes replaced by
    float initializers; ValueError if a DequantizeLinear acts on a run-time tensor."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    values = constant_values(graph)
    keep, folded = [], []
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            keep.append(node)
        elif node.output[0] in values:
            folded.append(numpy_helper.from_array(values[node.output[0]], node.output[0]))
        else:
            raise ValueError(f"DequantizeLinear '{node.name}' dequantises a run-time tensor "
                             f"({node.input[0]}): activation-quantised graphs cannot be made "
                             "differentiable here")
    used = {name for node in keep for name in node.input} | {o.name for o in graph.output}
    inits = [i for i in graph.initializer if i.name in used] + folded
    del graph.node[:]
    graph.node.extend(keep)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return model


def onnx_to_torch(path: str | Path) -> nn.Module:
    """The ONNX file at ``path`` as a torch ``GraphModule`` (float32, differentiable)."""
    import onnx
    from onnx2torch import convert

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    try:
        return convert(fold_weight_dequantize(onnx.load(str(path))))
    except NotImplementedError as exc:
        raise ValueError(f"cannot convert {path} to a torch module: {exc}") from None
