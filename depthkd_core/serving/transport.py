"""uvicorn for the teacher server: the connection bounds of ``ServerLimits`` (header and
reply timeouts uvicorn lacks, keep-alive, connection and header-size limits), and a
background server for tests and the on-robot benchmark."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from .server import DEFAULT_SERVER, ServerLimits

LOG = logging.getLogger(__name__)

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
