"""The I/O contract of a depthkd ONNX export: ``image`` (B,3,H,W) float32 RGB in [0,1]
in, ``depth`` (B,1,H,W) float32 metres out; shared by the fp32 export and its int8 form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from depthkd_core.imaging import resize_rgb, rgb_to_chw


def images_to_batch(images: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """uint8 HxWx3 RGB images -> (B,3,height,width) float32 in [0,1]."""
    out = []
    for i, rgb in enumerate(images):
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"image {i} must be uint8 HxWx3 RGB, got {rgb.dtype} {rgb.shape}")
        rgb = resize_rgb(rgb, height, width)
        out.append(rgb_to_chw(rgb))
    return np.stack(out)


def check_io_contract(path: Path, height: int, width: int, dynamic_batch: bool) -> None:
    """onnx.checker plus the I/O contract: image (B,3,H,W) -> depth (B,1,H,W), float32."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    batch = "batch" if dynamic_batch else 1
    want = {"image": [batch, 3, height, width], "depth": [batch, 1, height, width]}
    for value in (*proto.graph.input, *proto.graph.output):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT or dims != want.pop(value.name, None):
            raise ValueError(f"exported graph has {value.name} {dims} (type "
                             f"{value.type.tensor_type.elem_type}); expected float32 image/depth")
    if want:
        raise ValueError(f"exported graph lacks {sorted(want)}")
