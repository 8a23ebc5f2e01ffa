"""KServe v2 / Open Inference Protocol tensors, JSON and binary forms.

Spec: https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/
and Triton's binary tensor data extension: the body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw little-endian bytes of
every tensor whose ``parameters.binary_data_size`` is set, in header order.
Only what depthkd needs is implemented: FP32/UINT8 tensors of rank 4 (NCHW).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"
JSON_CONTENT_TYPE = "application/json"
# Explicit little-endian: the extension's wire order, whatever the host's order.
DTYPES: dict[str, np.dtype] = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}


class PayloadTooLarge(ValueError):
    """The request exceeds a size limit (HTTP 413 rather than 400)."""


@dataclass(frozen=True)
class TensorLimits:
    """What a request may carry; everything else is refused with a reason."""

    max_batch: int = 8
    max_height: int = 2048
    max_width: int = 2048
    min_size: int = 8
    max_body_bytes: int = 64 << 20
    dtypes: tuple[str, ...] = ("FP32", "UINT8")
    rank: int = 4


def datatype_of(array: np.ndarray) -> str:
    """KServe datatype name of a numpy array; ValueError for unsupported dtypes."""
    for name, dtype in DTYPES.items():
        if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
            return name
    raise ValueError(f"unsupported dtype {array.dtype}; supported: {sorted(DTYPES)}")


def validate_tensor(spec: dict[str, Any], limits: TensorLimits | None) -> tuple[str, str, tuple[int, ...]]:
    """Check one tensor description -> (name, datatype, shape); ValueError names the problem."""
    if not isinstance(spec, dict):
        raise ValueError("each tensor must be a JSON object")
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if not isinstance(name, str) or not name:
        raise ValueError("tensor without a 'name'")
    if datatype not in DTYPES or (limits is not None and datatype not in limits.dtypes):
        allowed = limits.dtypes if limits is not None else tuple(DTYPES)
        raise ValueError(f"tensor '{name}': datatype {datatype!r} not allowed, use one of {list(allowed)}")
    if (not isinstance(shape, list) or not all(type(d) is int for d in shape)
            or any(d < 0 for d in shape)):
        raise ValueError(f"tensor '{name}': shape must be a list of non-negative integers, got {shape!r}")
    if limits is not None:
        _check_limits(name, tuple(shape), limits)
    return name, datatype, tuple(shape)


def _check_limits(name: str, shape: tuple[int, ...], limits: TensorLimits) -> None:
    if len(shape) != limits.rank:
        raise ValueError(f"tensor '{name}': rank {len(shape)}, expected {limits.rank} (NCHW)")
    batch, _, height, width = shape
    if not 1 <= batch <= limits.max_batch:
        raise ValueError(f"tensor '{name}': batch {batch} outside 1..{limits.max_batch}")
    if not limits.min_size <= height <= limits.max_height:
        raise ValueError(f"tensor '{name}': height {height} outside {limits.min_size}..{limits.max_height}")
    if not limits.min_size <= width <= limits.max_width:
        raise ValueError(f"tensor '{name}': width {width} outside {limits.min_size}..{limits.max_width}")


def _json_tensor(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    dtype = DTYPES[datatype]
    try:
        array = np.asarray(data, dtype=dtype).reshape(-1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"tensor '{name}': 'data' is not a list of {datatype} numbers ({exc})") from None
    if array.size != math.prod(shape):
        raise ValueError(f"tensor '{name}': {array.size} values for shape {list(shape)}")
    return array.reshape(shape)


def _binary_tensor(name: str, datatype: str, shape: tuple[int, ...], size: Any,
                   payload: memoryview, offset: int) -> np.ndarray:
    dtype = DTYPES[datatype]
    expected = math.prod(shape) * dtype.itemsize
    if type(size) is not int or size != expected:
        raise ValueError(f"tensor '{name}': binary_data_size {size!r} but shape {list(shape)} "
                         f"of {datatype} needs {expected} bytes")
    if offset + size > len(payload):
        raise ValueError(f"tensor '{name}': body ends {offset + size - len(payload)} bytes early")
    return np.frombuffer(payload[offset:offset + size], dtype=dtype).reshape(shape)


def encode_message(header: dict[str, Any], key: str, tensors: dict[str, np.ndarray],
                   binary: bool) -> tuple[bytes, int | None]:
    """JSON ``header`` plus ``tensors`` under ``key`` ("inputs"/"outputs") -> (body, json length).

    The json length (for ``Inference-Header-Content-Length``) is None for pure JSON."""
    specs, chunks = [], []
    for name, array in tensors.items():
        array = np.asarray(array)
        datatype = datatype_of(array)
        spec: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype}
        if binary:
            raw = np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()
            spec["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            spec["data"] = array.reshape(-1).tolist()
        specs.append(spec)
    text = json.dumps({**header, key: specs}).encode()
    if not binary:
        return text, None
    return b"".join([text, *chunks]), len(text)


def decode_message(body: bytes, json_length: int | str | None, key: str,
                   limits: TensorLimits | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Inverse of :func:`encode_message` -> (JSON header, {name: array}); ValueError on any defect."""
    if limits is not None and len(body) > limits.max_body_bytes:
        raise PayloadTooLarge(f"request of {len(body)} bytes exceeds {limits.max_body_bytes}")
    length = _header_length(body, json_length)
    try:
        header = json.loads(body[:length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"request header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get(key), list) or not header[key]:
        raise ValueError(f"message needs a non-empty '{key}' list")
    payload, offset, tensors = memoryview(body)[length:], 0, {}
    for spec in header[key]:
        name, datatype, shape = validate_tensor(spec, limits)
        if name in tensors:
            raise ValueError(f"tensor '{name}' given twice")
        params = spec.get("parameters") or {}
        if not isinstance(params, dict):
            raise ValueError(f"tensor '{name}': 'parameters' must be an object")
        if "binary_data_size" in params:
            tensors[name] = _binary_tensor(name, datatype, shape, params["binary_data_size"],
                                           payload, offset)
            offset += params["binary_data_size"]
        elif "data" in spec:
            tensors[name] = _json_tensor(name, datatype, shape, spec["data"])
        else:
            raise ValueError(f"tensor '{name}' has neither 'data' nor binary_data_size")
    if offset != len(payload):
        raise ValueError(f"{len(payload) - offset} unclaimed bytes after the tensors")
    return header, tensors


def _header_length(body: bytes, json_length: int | str | None) -> int:
    if json_length is None:
        return len(body)
    try:
        length = int(json_length)
    except ValueError:
        raise ValueError(f"{HEADER_LENGTH} is not an integer: {json_length!r}") from None
    if not 0 < length <= len(body):
        raise ValueError(f"{HEADER_LENGTH} {length} outside 1..{len(body)} (body size)")
    return length


def wants_binary_output(header: dict[str, Any], name: str) -> bool:
    """Whether the request asked for output ``name`` in binary (request- or output-level)."""
    params = header.get("parameters") or {}
    if isinstance(params, dict) and params.get("binary_data_output"):
        return True
    for spec in header.get("outputs") or []:
        if isinstance(spec, dict) and spec.get("name") == name:
            return bool((spec.get("parameters") or {}).get("binary_data"))
    return False
