"""The parts of a camera node both depthkd nodes share: the newest-frame worker and
the diagnostics message.

A camera callback must return at once (the executor also serves parameters and the
other topics), and only the newest frame is worth work: ``NewestFrameWorker`` keeps
one pending message, replaced by each new one, and a thread that takes it and runs
the node's handler off the executor.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable, Generic, TypeVar

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node

M = TypeVar("M")


class NewestFrameWorker(Generic[M]):
    """One slot and one thread: ``put`` replaces the pending message (True when that
    dropped one nobody had taken yet); the thread hands each taken message to ``handle``."""

    def __init__(self, handle: Callable[[M], None], name: str) -> None:
        self._handle = handle
        self._lock = threading.Lock()
        self._pending: M | None = None
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, msg: M) -> bool:
        with self._lock:
            dropped = self._pending is not None
            self._pending = msg
        self._wake.set()
        return dropped

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._wake.wait(0.1):
                continue
            with self._lock:
                msg, self._pending = self._pending, None
                self._wake.clear()
            if msg is not None:
                self._handle(msg)

    def stop(self, timeout: float) -> None:
        """Ends the thread after the message in hand (waits at most ``timeout`` s)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)


def diagnostic_value(value: Any) -> str:
    """A diagnostics KeyValue's text: floats to 3 decimals, dicts as JSON."""
    if isinstance(value, float):
        return f"{value:.3f}"
    return json.dumps(value) if isinstance(value, dict) else str(value)


def diagnostics(node: Node, name: str, level: bytes, message: str, hardware_id: str,
                values: dict[str, Any]) -> DiagnosticArray:
    """A /diagnostics message of one status named ``<node's full name>: <name>``."""
    status = DiagnosticStatus(level=level, name=f"{node.get_fully_qualified_name()}: {name}",
                              message=message, hardware_id=hardware_id,
                              values=[KeyValue(key=k, value=diagnostic_value(v)) for k, v in values.items()])
    array = DiagnosticArray(status=[status])
    array.header.stamp = node.get_clock().now().to_msg()
    return array
