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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

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


class Slots:
    """At most ``size`` holders at once; ``take`` never waits (the caller refuses instead).
    Used from the event loop only, so a plain counter."""

    def __init__(self, size: int) -> None:
        self.size, self.busy = size, 0

    def take(self) -> bool:
        if self.busy >= self.size:
            return False
        self.busy += 1
        return True

    def give(self) -> None:
        self.busy -= 1


@dataclass
class _Job:
    images: np.ndarray
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Collects queued requests for up to ``max_wait_ms`` (or ``max_batch`` images) and runs
    each same-size group as one teacher call. ``calls`` counts teacher calls."""

    def __init__(self, teacher: Teacher, max_batch: int = 8, max_wait_ms: float = 5.0) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch}, {max_wait_ms}")
        self.teacher, self.max_batch, self.max_wait = teacher, max_batch, max_wait_ms / 1000.0
        self.calls = 0
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._held: _Job | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """(B,3,H,W) float32 -> depth (B,1,H,W) float32, batched with concurrent calls."""
        if not self.running:
            raise RuntimeError("batcher is not running")
        job = _Job(images, asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        return await job.future

    async def _collect(self) -> list[_Job]:
        jobs = [self._held or await self._queue.get()]
        self._held, count = None, len(jobs[0].images)
        deadline = time.monotonic() + self.max_wait
        while count < self.max_batch and (remaining := deadline - time.monotonic()) > 0:
            try:
                job = await asyncio.wait_for(self._queue.get(), remaining)
            except asyncio.TimeoutError:
                break
            if count + len(job.images) > self.max_batch:
                self._held = job  # would overflow the batch: first in the next one
                break
            jobs.append(job)
            count += len(job.images)
        return jobs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            groups: dict[tuple[int, int], list[_Job]] = {}
            for job in await self._collect():
                if not job.future.done():  # its request was abandoned (and gave its slot back)
                    groups.setdefault(job.images.shape[2:], []).append(job)
            for jobs in groups.values():
                batch = jobs[0].images if len(jobs) == 1 else np.concatenate([job.images for job in jobs])
                try:
                    depth = await loop.run_in_executor(self._executor, self._predict, batch)
                except Exception as exc:  # handed to each waiting request, never kills the worker
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(exc)
                    continue
                start = 0
                for job in jobs:
                    if not job.future.done():
                        job.future.set_result(depth[start:start + len(job.images)])
                    start += len(job.images)

    def _predict(self, batch: np.ndarray) -> np.ndarray:
        import torch  # here, not at import: the program checks its arguments before loading torch

        self.calls += 1
        with torch.no_grad():
            depth = self.teacher(torch.from_numpy(batch))
        return depth.detach().to("cpu", torch.float32).numpy()


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


def uvicorn_config(app: Any, **options: Any) -> Any:
    """``uvicorn.Config`` for ``app`` with its ``app.state.server_limits`` (defaults for an
    app without) on the connections: h11, whose header size limit uvicorn honours, plus
    the header and reply timeouts uvicorn lacks, keep-alive and connection limits.
    ``options`` are further ``uvicorn.Config`` arguments (host, port, ssl_*...)."""
    import uvicorn

    limits = getattr(app.state, "server_limits", DEFAULT_SERVER)
    return uvicorn.Config(app, http=_timed_protocol(limits), lifespan="on",
                          timeout_keep_alive=limits.keep_alive_s, limit_concurrency=limits.max_connections,
                          h11_max_incomplete_event_size=limits.max_header_bytes, **options)


def _timed_protocol(limits: ServerLimits) -> type:
    """uvicorn's h11 protocol with two timeouts it lacks (it times only idle keep-alive
    connections): a client sending nothing, or a header a byte at a time, or reading
    nothing of its reply, held its connection, a connection slot, and its reply buffer,
    forever.

    - headers: the request line and headers must be complete ``header_timeout_s`` after
      the connection opened, or after its first byte following a reply; else closed.
    - reply: if the send buffer, once full (asyncio paused writing), has not drained
      within ``reply_timeout_s``, the connection is aborted, dropping what was buffered."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _reply_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._headers_late)

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._header_timer = self.loop.call_later(limits.header_timeout_s, self._headers_late)
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # h11 parsed a request line and headers
                self._header_timer = _cancel(self._header_timer)

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._reply_timer is None:
                self._reply_timer = self.loop.call_later(limits.reply_timeout_s, self._reply_stalled)

        def resume_writing(self) -> None:
            self._reply_timer = _cancel(self._reply_timer)
            super().resume_writing()

        def connection_lost(self, exc: Exception | None) -> None:
            self._header_timer = _cancel(self._header_timer)
            self._reply_timer = _cancel(self._reply_timer)
            super().connection_lost(exc)

        def _headers_late(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                LOG.info("closing %s: no complete request headers within %g s", self.client,
                         limits.header_timeout_s)
                self.transport.close()

        def _reply_stalled(self) -> None:
            self._reply_timer = None
            LOG.info("aborting %s: its reply not drained within %g s", self.client, limits.reply_timeout_s)
            self.transport.abort()  # close() would wait for the buffer to drain

    return TimedH11Protocol


def _cancel(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()


class BackgroundServer:
    """uvicorn serving ``app`` in a daemon thread (tests, the distill end-to-end run).

    ``with BackgroundServer(app) as url:`` binds 127.0.0.1 on an ephemeral port, with the
    bounds of :func:`uvicorn_config`; ``options`` go to ``uvicorn.Config`` (e.g.
    ssl_keyfile/ssl_certfile for https)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0,
                 startup_timeout_s: float = 20.0, **options: Any) -> None:
        import uvicorn

        config = uvicorn_config(app, host=host, port=port, log_level="warning", **options)
        self.server = uvicorn.Server(config)
        self.host, self.timeout = host, startup_timeout_s
        self.scheme = "https" if options.get("ssl_certfile") else "http"
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="uvicorn")

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"{self.scheme}://{self.host}:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=self.timeout)
