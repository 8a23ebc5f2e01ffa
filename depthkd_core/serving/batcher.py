"""The teacher server's work queue: concurrent requests batched into teacher calls.

``Slots`` bounds the requests in progress (the caller refuses beyond it); ``Batcher``
runs each same-size group of queued images as one call of the teacher, in one thread.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # importing the teachers loads torch, which checking arguments does not need
    from ..models.teacher_base import Teacher


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
