"""KServe v2 / Open Inference Protocol tensors, JSON and binary forms.

Spec: https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/
and Triton's binary tensor data extension: the body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw little-endian bytes of
every tensor whose ``parameters.binary_data_size`` is set, in header order.
Only what depthkd needs is implemented: FP32/UINT8 tensors of rank 4 (NCHW).
A server reading a request (``limits`` given) is strict: sizes are bounded before
anything is allocated for them, JSON data must be a flat list of numbers, and
:func:`request_options` refuses fields it does not implement instead of ignoring them.
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
    """What a request may carry; everything else is refused with a reason.

    ``max_pixels`` bounds batch * height * width of a tensor (the server's float32 copy
    of the input and the depth it returns grow with it: 16 bytes a pixel); the default
    is one image of the largest size. ``max_body_bytes`` bounds the whole body, and
    ``max_json_bytes`` its JSON part (the whole body of a request without the binary
    extension): parsed JSON costs several times its size in Python objects."""

    max_batch: int = 8
    max_height: int = 2048
    max_width: int = 2048
    min_size: int = 8
    max_pixels: int = 2048 * 2048
    max_body_bytes: int = 64 << 20
    max_json_bytes: int = 8 << 20
    dtypes: tuple[str, ...] = ("FP32", "UINT8")
    rank: int = 4

    def __post_init__(self) -> None:
        sizes = (self.max_batch, self.max_height, self.max_width, self.min_size, self.max_pixels,
                 self.max_body_bytes, self.max_json_bytes)
        if min(sizes) < 1 or self.min_size > min(self.max_height, self.max_width):
            raise ValueError(f"tensor limits must be >= 1 and min_size <= max height/width, got {self}")


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
    if batch * height * width > limits.max_pixels:
        raise PayloadTooLarge(f"tensor '{name}': batch*height*width = {batch * height * width} pixels "
                              f"exceeds {limits.max_pixels}; send fewer or smaller images")


# JSON value types a tensor's flat "data" list may hold (bool is not a number here).
_JSON_NUMBERS = {"FP32": {int, float}, "UINT8": {int}}


def _json_tensor(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    if not isinstance(data, list):
        raise ValueError(f"tensor '{name}': 'data' must be a flat list of numbers, got {type(data).__name__}")
    if len(data) != math.prod(shape):
        raise ValueError(f"tensor '{name}': {len(data)} values for shape {list(shape)}")
    kinds = set(map(type, data))  # in C: no Python loop over the values
    if not kinds <= _JSON_NUMBERS[datatype]:
        found = sorted(kind.__name__ for kind in kinds - _JSON_NUMBERS[datatype])
        raise ValueError(f"tensor '{name}': 'data' is not a list of {datatype} numbers "
                         f"(found {', '.join(found)})")
    try:
        with np.errstate(over="ignore"):  # beyond FP32 becomes inf, which the server refuses
            array = np.asarray(data, dtype=DTYPES[datatype])
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"tensor '{name}': 'data' is not a list of {datatype} numbers ({exc})") from None
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
            # A view, not tobytes(): the body below is the only copy.
            raw = memoryview(np.ascontiguousarray(array, dtype=DTYPES[datatype])).cast("B")
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
    if limits is not None and length > limits.max_json_bytes:
        raise PayloadTooLarge(f"JSON of {length} bytes exceeds {limits.max_json_bytes}; "
                              f"send tensors in binary ({HEADER_LENGTH})")
    try:
        header = json.loads(body[:length])
    except RecursionError:
        raise ValueError("request header is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, integers too long to parse
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


# Request fields this server implements; any other is refused, not silently ignored
# (a misspelt "binary_data_ouput" or a shared-memory parameter would otherwise change
# the meaning of the request without a word).
REQUEST_FIELDS = {"id", "parameters", "inputs", "outputs"}
REQUEST_PARAMETERS = {"binary_data_output"}
INPUT_FIELDS = {"name", "shape", "datatype", "parameters", "data"}
INPUT_PARAMETERS = {"binary_data_size"}
OUTPUT_FIELDS = {"name", "parameters"}
OUTPUT_PARAMETERS = {"binary_data"}


@dataclass(frozen=True)
class RequestOptions:
    """What a request asks of the reply: its ``id`` and which outputs come in binary."""

    id: str | None
    binary: dict[str, bool]


def _known(what: str, given: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(given, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(given).__name__}")
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(f"{what}: unsupported field(s) {unknown}; supported: {sorted(allowed)}")
    return given


def _flag(what: str, value: Any) -> bool:
    if type(value) is not bool:
        raise ValueError(f"{what} must be true or false, got {value!r}")
    return value


def request_options(header: dict[str, Any], outputs: tuple[str, ...]) -> RequestOptions:
    """Check a decoded request's fields (beyond the tensors) -> its options; ValueError
    names the defect. ``outputs`` are the model's output names; an output's own
    ``binary_data`` overrides the request-level ``binary_data_output``."""
    _known("request", header, REQUEST_FIELDS)
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ValueError(f"'id' must be a string, got {type(request_id).__name__}")
    params = _known("request 'parameters'", header.get("parameters", {}), REQUEST_PARAMETERS)
    default = _flag("'binary_data_output'", params.get("binary_data_output", False))
    for spec in header["inputs"]:
        _known(f"input '{spec['name']}'", spec, INPUT_FIELDS)
        _known(f"input '{spec['name']}' parameters", spec.get("parameters", {}), INPUT_PARAMETERS)
    asked = header.get("outputs", [])
    if not isinstance(asked, list):
        raise ValueError(f"'outputs' must be a list, got {type(asked).__name__}")
    binary = {name: default for name in outputs}
    named: set[str] = set()
    for spec in asked:
        spec = _known("each output", spec, OUTPUT_FIELDS)
        name = spec.get("name")
        if name not in outputs or name in named:
            raise ValueError(f"output {name!r} unknown or asked twice; this model has {list(outputs)}")
        named.add(name)
        params = _known(f"output '{name}' parameters", spec.get("parameters", {}), OUTPUT_PARAMETERS)
        binary[name] = _flag(f"output '{name}' binary_data", params.get("binary_data", default))
    return RequestOptions(request_id, {name: binary[name] for name in (named or outputs)})
