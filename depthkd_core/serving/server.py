"""A depthkd teacher behind the KServe v2 / Open Inference Protocol (FastAPI).

Input ``image``: FP32 (B,3,H,W) RGB in [0,1] (UINT8 NCHW in 0..255 is also accepted
and scaled by 1/255, a 4x smaller upload); output ``depth``: FP32 (B,1,H,W) at the
input size. Concurrent requests are batched by one worker (asyncio queue, teacher in a
single-thread executor), so the teacher never runs in two threads at once.

Every request is checked in full (token, media type, sizes, tensors, fields, reply size)
before the teacher runs, and refused with a 4xx and a reason; :class:`ServerLimits`
bounds the work in progress (503 + Retry-After beyond it), the time a client may take
to send its request, and the connections (docs/teacher_server.md, "Bounds").
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from .batcher import Batcher, Slots
from .protocol import (BINARY_CONTENT_TYPE, HEADER_LENGTH, JSON_CONTENT_TYPE, PayloadTooLarge,
                       RequestOptions, TensorLimits, decode_message, encode_message, request_options)

if TYPE_CHECKING:  # importing the teachers loads torch, which checking arguments does not need
    from ..models.teacher_base import Teacher

LOG = logging.getLogger(__name__)
INPUT, OUTPUT = "image", "depth"
DEFAULT_LIMITS = TensorLimits()
# RFC 6750 b64token: what may follow "Bearer " in an Authorization header.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on the server's work in progress, its memory and its connections.

    - ``max_inflight``: inference requests in progress at once, from reading the body to
      building the reply. One more gets 503 with ``Retry-After: retry_after_s`` at once,
      its body unread: memory stays at most ``max_inflight`` largest requests, and load
      beyond that costs nothing but the refusal (no queue grows).
    - ``max_json_reply_values``: largest depth (batch*height*width) answered as JSON; a
      request asking for more is refused before the teacher runs (ask for binary): a
      JSON number costs ~20 bytes of text plus a Python float while it is encoded.
    - ``body_timeout_s``: the whole body must arrive within it (408 otherwise).
    - ``header_timeout_s``: a connection must complete its request line and headers
      within it, from its opening or its first byte after a reply; else it is closed.
    - ``reply_timeout_s``: once a reply fills the server's send buffer, the client must
      drain it within this time, or it is disconnected and the buffer freed.
    - ``keep_alive_s``: an idle keep-alive connection is closed after it.
    - ``max_connections``: a request arriving while this many connections are open gets
      uvicorn's 503 (its ``limit_concurrency``).
    - ``max_header_bytes``: request line plus headers (h11); beyond, a 400.
    """

    max_inflight: int = 4
    retry_after_s: int = 1
    max_json_reply_values: int = 1 << 20
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    reply_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_connections: int = 64
    max_header_bytes: int = 16 << 10

    def __post_init__(self) -> None:
        if min(self.max_inflight, self.retry_after_s, self.max_json_reply_values, self.max_connections,
               self.max_header_bytes) < 1 or min(self.body_timeout_s, self.header_timeout_s,
                                                 self.reply_timeout_s, self.keep_alive_s) <= 0:
            raise ValueError(f"server limits must be positive, got {self}")


DEFAULT_SERVER = ServerLimits()


def check_token(token: str | None) -> None:
    """ValueError unless ``token`` is None or usable in ``Authorization: Bearer <token>``:
    blank or whitespace would either match no request (HTTP strips it) or nearly none."""
    if token is not None and not TOKEN_PATTERN.fullmatch(token):
        raise ValueError("the bearer token must be non-blank letters, digits and -._~+/ "
                         "(e.g. `openssl rand -hex 32`)")


def bearer_matches(authorization: str, token: str) -> bool:
    """Whether an ``Authorization`` value carries ``token``: the scheme is
    case-insensitive (RFC 9110), the credentials are compared in constant time."""
    scheme, _, credentials = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.lstrip(" ").encode(),
                                                              token.encode())


def _error(status: int, reason: str, close: bool = False, **headers: str) -> JSONResponse:
    """``close``: the request body may be unread, so the connection is not reused."""
    if close:
        headers["Connection"] = "close"
    return JSONResponse({"error": reason}, status_code=status, headers=headers or None)


async def _read_body(request: Request, limits: TensorLimits) -> bytearray:
    """The body, refusing (PayloadTooLarge) as soon as it passes its limit. One growing
    buffer (no list of chunks joined at the end: that would hold it twice)."""
    limit, what = _body_limit(request, limits)
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise PayloadTooLarge(f"body exceeds the {limit}-byte limit for {what}")
        body += chunk
    return body


def _body_limit(request: Request, limits: TensorLimits) -> tuple[int, str]:
    """(limit, what it applies to): without the binary extension the body is all JSON."""
    if HEADER_LENGTH in request.headers:
        return limits.max_body_bytes, "requests"
    return limits.max_json_bytes, f"JSON requests (binary tensors, with {HEADER_LENGTH}, may be larger)"


def image_input(tensors: dict[str, np.ndarray]) -> np.ndarray:
    """The ``image`` tensor as float32 (B,3,H,W) in [0,1]; ValueError naming the defect."""
    if set(tensors) != {INPUT}:
        raise ValueError(f"expected exactly one input '{INPUT}', got {sorted(tensors)}")
    images = tensors[INPUT]
    if images.shape[1] != 3:
        raise ValueError(f"input '{INPUT}' must be (B,3,H,W) RGB, got shape {list(images.shape)}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if not np.isfinite(images).all():
        raise ValueError(f"input '{INPUT}' contains NaN or infinite values")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:  # most likely 0..255 sent as FP32
        raise ValueError(f"input '{INPUT}' FP32 values must be RGB in [0,1], got [{low:g}, {high:g}] "
                         f"(send 0..255 as UINT8)")
    # Copies only when the request buffer does not fit torch (unaligned or read-only).
    return np.require(images, np.float32, ["C_CONTIGUOUS", "ALIGNED", "WRITEABLE"])


def model_metadata(teacher: Teacher, model_name: str) -> dict[str, Any]:
    """KServe v2 model metadata; -1 marks a variable dimension."""
    return {
        "name": model_name, "versions": ["1"], "platform": "depthkd",
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, 3, -1, -1]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, 1, -1, -1]}],
        "parameters": {"is_metric": bool(teacher.is_metric), "is_inverse": bool(teacher.is_inverse),
                       "input_range": "RGB in [0,1] (FP32) or 0..255 (UINT8)",
                       "teacher": teacher.name},
    }


def create_app(teacher: Teacher, model_name: str, token: str | None = None,
               limits: TensorLimits = DEFAULT_LIMITS, max_batch: int = 8,
               max_wait_ms: float = 5.0, server: ServerLimits = DEFAULT_SERVER) -> FastAPI:
    """The server for one teacher. With ``token`` every route but /v2/health/* needs
    ``Authorization: Bearer <token>``. ``app.state`` exposes ``batcher``, ``slots`` (the
    requests in progress) and ``server_limits`` (also read by :func:`uvicorn_config`)."""
    check_token(token)
    batcher = Batcher(teacher, max_batch, max_wait_ms)
    slots = Slots(server.max_inflight)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    # No /docs or /openapi.json: nothing to browse on a server that may face a network.
    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.slots, app.state.server_limits = batcher, slots, server

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        if token is not None and not request.url.path.startswith("/v2/health/"):
            if not bearer_matches(request.headers.get("authorization", ""), token):
                return _error(401, "missing or wrong bearer token", close=True,
                              **{"WWW-Authenticate": "Bearer"})
        try:
            return await call_next(request)
        except Exception:
            LOG.exception("unhandled error on %s", request.url.path)
            return _error(500, "internal server error")

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return JSONResponse({"ready": batcher.running}, status_code=200 if batcher.running else 503)

    @app.get("/v2/models/{name}")
    async def metadata(name: str) -> Response:
        if name != model_name:
            return _error(404, f"unknown model '{name}'; this server has '{model_name}'")
        return JSONResponse(model_metadata(teacher, model_name))

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        if name != model_name:
            return _error(404, f"unknown model '{name}'; this server has '{model_name}'")
        refused = _refuse_early(request, limits)
        if refused is not None:
            return refused
        if not slots.take():  # before the body is read: refusing must cost no memory
            wait = str(server.retry_after_s)
            return _error(503, f"busy: {slots.size} requests in progress; retry after {wait} s", close=True,
                          **{"Retry-After": wait})
        try:
            return await _infer(request, batcher, limits, server, model_name)
        finally:
            slots.give()

    return app


def _refuse_early(request: Request, limits: TensorLimits) -> Response | None:
    """415/413 from the headers alone, before a slot is taken or a byte of body read."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media not in ("", JSON_CONTENT_TYPE, BINARY_CONTENT_TYPE):
        return _error(415, f"Content-Type {media!r} not supported: send {JSON_CONTENT_TYPE} or, with "
                           f"{HEADER_LENGTH}, {BINARY_CONTENT_TYPE}", close=True)
    declared, (limit, what) = request.headers.get("content-length", ""), _body_limit(request, limits)
    if declared.isdigit() and int(declared) > limit:
        return _error(413, f"{declared}-byte body exceeds the {limit}-byte limit for {what}", close=True)
    return None


async def _infer(request: Request, batcher: Batcher, limits: TensorLimits, server: ServerLimits,
                 model_name: str) -> Response:
    """One inference request, checked in full before the teacher runs: 4xx with a reason
    for anything wrong, else the depth."""
    start = time.perf_counter()
    try:
        body = await asyncio.wait_for(_read_body(request, limits), server.body_timeout_s)
        header, tensors = decode_message(body, request.headers.get(HEADER_LENGTH), "inputs", limits)
        options = request_options(header, (OUTPUT,))
        images = image_input(tensors)
        del body, tensors  # images is a copy, or a view that keeps the body alive by itself
        values = images.shape[0] * images.shape[2] * images.shape[3]
        if not options.binary[OUTPUT] and values > server.max_json_reply_values:
            raise ValueError(f"a JSON reply of {values} depth values exceeds {server.max_json_reply_values}; "
                             f'ask for binary: "outputs": [{{"name": "{OUTPUT}", '
                             f'"parameters": {{"binary_data": true}}}}]')
    except PayloadTooLarge as exc:
        return _error(413, str(exc), close=True)
    except ValueError as exc:
        return _error(400, str(exc))
    except asyncio.TimeoutError:
        return _error(408, f"request body not received within {server.body_timeout_s:g} s", close=True)
    except ClientDisconnect:  # nobody to answer; not a server error
        LOG.info("client disconnected while sending its request")
        return _error(400, "client disconnected", close=True)
    try:
        depth = await batcher.submit(images)
    except ValueError as exc:  # the teacher refusing this input is still the client's fault
        return _error(400, f"teacher refused the input: {exc}")
    return _respond(options, model_name, depth, start)


def _respond(options: RequestOptions, model_name: str, depth: np.ndarray, start: float) -> Response:
    reply = {"model_name": model_name, "model_version": "1"}
    if options.id is not None:
        reply["id"] = options.id
    body, length = encode_message(reply, "outputs", {OUTPUT: depth}, options.binary[OUTPUT])
    LOG.info("infer id=%s shape=%s latency_ms=%.1f", reply.get("id", "-"), list(depth.shape),
             (time.perf_counter() - start) * 1000.0)
    if length is None:
        return Response(body, media_type=JSON_CONTENT_TYPE)
    return Response(body, media_type=BINARY_CONTENT_TYPE, headers={HEADER_LENGTH: str(length)})
