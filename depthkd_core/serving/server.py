"""A depthkd teacher behind the KServe v2 / Open Inference Protocol (FastAPI).

Input ``image``: FP32 (B,3,H,W) RGB in [0,1] (UINT8 NCHW in 0..255 is also accepted
and scaled by 1/255, a 4x smaller upload); output ``depth``: FP32 (B,1,H,W) at the
input size. Concurrent requests are batched by one worker (asyncio queue, teacher in a
single-thread executor), so the teacher never runs in two threads at once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..models.teacher_base import Teacher
from .protocol import (BINARY_CONTENT_TYPE, HEADER_LENGTH, JSON_CONTENT_TYPE, PayloadTooLarge,
                       TensorLimits, decode_message, encode_message, wants_binary_output)

LOG = logging.getLogger(__name__)
INPUT, OUTPUT = "image", "depth"
DEFAULT_LIMITS = TensorLimits()


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
                groups.setdefault(job.images.shape[2:], []).append(job)
            for jobs in groups.values():
                batch = np.concatenate([job.images for job in jobs])
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
        self.calls += 1
        with torch.no_grad():
            depth = self.teacher(torch.from_numpy(batch))
        return depth.detach().to("cpu", torch.float32).numpy()


def _error(status: int, reason: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers or None)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (PayloadTooLarge) as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request of {declared} bytes exceeds {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


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
    return np.array(images, dtype=np.float32)  # a writable copy, off the request buffer


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
               max_wait_ms: float = 5.0) -> FastAPI:
    """The server for one teacher. With ``token`` every route but /v2/health/* needs
    ``Authorization: Bearer <token>``. ``app.state.batcher`` exposes the batcher."""
    batcher = Batcher(teacher, max_batch, max_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    # No /docs or /openapi.json: nothing to browse on a server that may face a network.
    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    expected = f"Bearer {token}".encode() if token else None

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        if expected is not None and not request.url.path.startswith("/v2/health/"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _error(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
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
        return await _infer(request, batcher, limits, model_name)

    return app


async def _infer(request: Request, batcher: Batcher, limits: TensorLimits, model_name: str) -> Response:
    """One inference request: 413/400 with a reason for bad input, else the depth."""
    start = time.perf_counter()
    try:
        body = await _read_body(request, limits.max_body_bytes)
        header, tensors = decode_message(body, request.headers.get(HEADER_LENGTH), "inputs", limits)
        images = image_input(tensors)
    except PayloadTooLarge as exc:
        return _error(413, str(exc))
    except ValueError as exc:
        return _error(400, str(exc))
    try:
        depth = await batcher.submit(images)
    except ValueError as exc:  # the teacher refusing this input is still the client's fault
        return _error(400, f"teacher refused the input: {exc}")
    return _respond(header, model_name, depth, start)


def _respond(header: dict[str, Any], model_name: str, depth: np.ndarray, start: float) -> Response:
    binary = wants_binary_output(header, OUTPUT)
    reply = {"model_name": model_name, "model_version": "1"}
    if isinstance(header.get("id"), str):
        reply["id"] = header["id"]
    body, length = encode_message(reply, "outputs", {OUTPUT: depth}, binary)
    LOG.info("infer id=%s shape=%s latency_ms=%.1f", reply.get("id", "-"), list(depth.shape),
             (time.perf_counter() - start) * 1000.0)
    if length is None:
        return Response(body, media_type=JSON_CONTENT_TYPE)
    return Response(body, media_type=BINARY_CONTENT_TYPE, headers={HEADER_LENGTH: str(length)})


class BackgroundServer:
    """uvicorn serving ``app`` in a daemon thread (tests, the distill end-to-end run).

    ``with BackgroundServer(app) as url:`` binds 127.0.0.1 on an ephemeral port;
    ``options`` go to ``uvicorn.Config`` (e.g. ssl_keyfile/ssl_certfile for https)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0,
                 startup_timeout_s: float = 20.0, **options: Any) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    lifespan="on", **options))
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
