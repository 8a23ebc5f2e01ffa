"""Client for a KServe v2 depth teacher (depthkd's server or NVIDIA Triton).

Binary tensor extension both ways; exponential backoff on connection errors,
timeouts, 5xx and malformed replies; no retry on 4xx (the request itself is wrong);
a circuit breaker so a dead teacher costs a fast exception, not a timeout per call.
A busy teacher (503 or 429 with Retry-After) is asked again no sooner than it says,
within the same bounded number of attempts, and does not count as a failure: it is
alive. A 408 (the upload was too slow) is retried like a 5xx.
"""

from __future__ import annotations

import logging
import ssl
import time
from typing import Any, Callable

import httpx
import numpy as np

from .protocol import BINARY_CONTENT_TYPE, HEADER_LENGTH, decode_message, encode_message

LOG = logging.getLogger(__name__)


class TeacherUnavailable(RuntimeError):
    """The teacher cannot answer now (down, failing, or the circuit breaker is open)."""


class TeacherRequestError(ValueError):
    """The teacher refused the request (4xx): retrying the same request will not help."""


class TeacherBusy(TeacherUnavailable):
    """Every attempt found the teacher busy (503/429 + Retry-After); ``retry_after_s``
    is what it asked for last."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CircuitBreaker:
    """Opens after ``failures`` consecutive failures; after ``cooldown_s`` lets one trial
    call through (half-open): success closes it, failure re-opens it."""

    def __init__(self, failures: int = 5, cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failures < 1 or cooldown_s < 0:
            raise ValueError(f"failures must be >= 1 and cooldown_s >= 0, got {failures}, {cooldown_s}")
        self.failures, self.cooldown_s, self.clock = failures, cooldown_s, clock
        self.consecutive = 0
        self.opened_at: float | None = None

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None and self.clock() - self.opened_at < self.cooldown_s

    def seconds_left(self) -> float:
        return 0.0 if self.opened_at is None else max(0.0, self.cooldown_s - (self.clock() - self.opened_at))

    def success(self) -> None:
        self.consecutive, self.opened_at = 0, None

    def failure(self) -> None:
        self.consecutive += 1
        if self.consecutive >= self.failures:
            self.opened_at = self.clock()


class TeacherClient:
    """``infer(images (B,3,H,W) float32 in [0,1]) -> depth (B,1,H,W) float32``."""

    def __init__(self, url: str, model_name: str, token: str | None = None, timeout_s: float = 10.0,
                 retries: int = 3, backoff_s: float = 0.2, max_backoff_s: float = 5.0,
                 breaker_failures: int = 5, breaker_cooldown_s: float = 30.0,
                 verify: bool | str = True, sleep: Callable[[float], None] = time.sleep,
                 max_retry_after_s: float = 10.0) -> None:
        """``max_retry_after_s`` caps the wait a busy teacher's Retry-After may impose
        (a server's number must not stall the robot for hours)."""
        if retries < 0 or backoff_s < 0 or timeout_s <= 0 or max_retry_after_s < 0:
            raise ValueError(f"need retries >= 0, backoff_s >= 0, timeout_s > 0, max_retry_after_s >= 0; "
                             f"got {retries}, {backoff_s}, {timeout_s}, {max_retry_after_s}")
        self.url, self.model_name = url.rstrip("/"), model_name
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.max_retry_after_s = max_retry_after_s
        self.sleep = sleep
        self.breaker = CircuitBreaker(breaker_failures, breaker_cooldown_s)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # verify: True, or a CA bundle path (e.g. the server's self-signed certificate).
        context = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
        self._http = httpx.Client(timeout=timeout_s, headers=headers, verify=context)
        self.last_latency_ms: float | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "TeacherClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ready(self) -> bool:
        """GET /v2/health/ready; False on any error (never raises, never retries)."""
        try:
            return self._http.get(f"{self.url}/v2/health/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def metadata(self) -> dict[str, Any]:
        """The model's KServe v2 metadata (inputs, outputs, parameters)."""
        reply = self._call(lambda: self._http.get(f"{self.url}/v2/models/{self.model_name}"))
        return reply.json()

    def infer(self, images: np.ndarray) -> np.ndarray:
        """Teacher depth for float32 (B,3,H,W) images in [0,1] -> (B,1,H,W) float32."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.float32:
            raise ValueError(f"images must be float32 (B,3,H,W), got {images.dtype} {images.shape}")
        body, length = encode_message({"outputs": [{"name": "depth", "parameters": {"binary_data": True}}]},
                                      "inputs", {"image": images}, binary=True)
        headers = {HEADER_LENGTH: str(length), "Content-Type": BINARY_CONTENT_TYPE}
        url = f"{self.url}/v2/models/{self.model_name}/infer"
        start = time.perf_counter()
        depth = self._call(lambda: self._http.post(url, content=body, headers=headers),
                           lambda reply: self._depth(reply, images.shape))
        self.last_latency_ms = (time.perf_counter() - start) * 1000.0
        return depth

    @staticmethod
    def _depth(reply: httpx.Response, shape: tuple[int, ...]) -> np.ndarray:
        _, tensors = decode_message(reply.content, reply.headers.get(HEADER_LENGTH), "outputs")
        depth = tensors.get("depth")
        expected = (shape[0], 1, *shape[2:])
        if depth is None or depth.shape != expected or depth.dtype != np.float32:
            got = None if depth is None else (depth.dtype, depth.shape)
            raise ValueError(f"reply has no float32 'depth' of shape {expected} (got {got})")
        return depth.copy()

    def _call(self, send: Callable[[], httpx.Response],
              parse: Callable[[httpx.Response], Any] = lambda reply: reply) -> Any:
        """``send`` with retries, backoff and the breaker; ``parse`` failures count as failures."""
        error, busy = "no attempt made", None
        for attempt in range(self.retries + 1):
            if self.breaker.is_open:
                raise TeacherUnavailable(f"teacher at {self.url} circuit open for "
                                         f"{self.breaker.seconds_left():.1f} s more (last: {error})")
            if attempt:
                backoff = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                self.sleep(backoff if busy is None else max(backoff, min(busy, self.max_retry_after_s)))
            busy = None
            try:
                reply = send()
                busy = _retry_after(reply)
                if busy is not None:
                    error = f"busy ({reply.status_code}): {_reason(reply)}"
                    LOG.info("teacher attempt %d/%d: %s; Retry-After %g s", attempt + 1,
                             self.retries + 1, error, busy)
                    continue
                # 408: the upload was too slow this time, not a wrong request.
                if 400 <= reply.status_code < 500 and reply.status_code != 408:
                    raise TeacherRequestError(f"teacher refused ({reply.status_code}): {_reason(reply)}")
                if reply.status_code != 200:
                    raise httpx.HTTPStatusError(f"{reply.status_code}: {_reason(reply)}",
                                                request=reply.request, response=reply)
                result = parse(reply)
            except TeacherRequestError:
                raise
            except (httpx.HTTPError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                LOG.warning("teacher attempt %d/%d failed: %s", attempt + 1, self.retries + 1, error)
                self.breaker.failure()
                continue
            self.breaker.success()
            return result
        if busy is not None:
            raise TeacherBusy(f"teacher at {self.url} busy on {self.retries + 1} attempts (last: {error})",
                              busy)
        raise TeacherUnavailable(f"teacher at {self.url} failed {self.retries + 1} attempts (last: {error})")


def _retry_after(reply: httpx.Response) -> float | None:
    """Seconds a busy reply (503, or a proxy's 429) asks to wait in ``Retry-After``
    (delta-seconds form); None if not such a reply."""
    value = reply.headers.get("retry-after", "").strip()
    if reply.status_code not in (429, 503) or not value.isdigit():
        return None
    return float(value)


def _reason(reply: httpx.Response) -> str:
    try:
        return str(reply.json().get("error", reply.text[:200]))
    except (ValueError, AttributeError):  # not JSON, or not an object
        return reply.text[:200]
