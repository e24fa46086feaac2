"""Dynamic batching: concurrent requests share one forward.

Each request hands its items to :meth:`DynamicBatcher.submit` and awaits its own rows of the result. One worker
task takes the oldest waiting request, waits until ``max_batch_size`` items are queued or ``max_wait_ms`` have
passed since that request arrived, and runs one forward (in a single dedicated thread, so the event loop keeps
accepting requests) over every queued request of the same reasoning mode that fits. Requests in the other mode
wait for the next round, so a batch is always one mode (one ``embed`` call). While a forward runs, new requests
queue and form the next batch: under load batches fill without waiting.

With batching off every request is its own forward, one at a time (the baseline the benchmark compares with).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moon3.model.items import Item

# run(items, reasoning) -> ((n, dim) float32 embeddings, n traces or None)
ForwardFn = Callable[[list[Item], bool], tuple[np.ndarray, list[str] | None]]


@dataclass
class _Job:
    items: list[Item]
    reasoning: bool
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    """Counts since start: forwards run, items embedded, and the largest batch."""

    forwards: int = 0
    items: int = 0
    largest: int = 0


class DynamicBatcher:
    """Merge concurrent embedding requests into batched forwards.

    Args:
        forward: runs one batch; called in the batcher's own thread, never concurrently with itself.
        max_batch_size: most items per forward (a single request larger than this still runs as one forward,
            which ``embed`` chunks).
        max_wait_ms: longest the oldest queued request waits for others before its batch runs.
        enabled: False = one forward per request, in arrival order.
        on_batch: called after each forward with ``(items, seconds)`` (metrics).
    """

    def __init__(
        self,
        forward: ForwardFn,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        enabled: bool = True,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        self.forward = forward
        self.max_batch_size = max(1, max_batch_size)
        self.max_wait = max(0.0, max_wait_ms) / 1000
        self.enabled = enabled
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._pending: deque[_Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moon3-forward")

    async def submit(self, items: list[Item], reasoning: bool) -> tuple[np.ndarray, list[str] | None]:
        """Embed ``items`` in the next batch of their mode; returns their embeddings and traces (reasoning on)."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._run(), name="moon3-batcher")
        job = _Job(list(items), reasoning, loop.create_future())
        self._pending.append(job)
        self._wakeup.set()
        return await job.future

    def close(self) -> None:
        """Stop the worker and the forward thread (pending requests are cancelled)."""
        if self._worker is not None:
            self._worker.cancel()
        for job in self._pending:
            if not job.future.done():
                job.future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _queued(self, reasoning: bool) -> int:
        return sum(len(j.items) for j in self._pending if j.reasoning == reasoning)

    def _take(self) -> list[_Job]:
        """The jobs of the next batch: the oldest, then later ones of its mode while they fit."""
        first = self._pending.popleft()
        batch, size = [first], len(first.items)
        if not self.enabled:
            return batch
        keep: deque[_Job] = deque()
        while self._pending:
            job = self._pending.popleft()
            if job.reasoning == first.reasoning and size + len(job.items) <= self.max_batch_size:
                batch.append(job)
                size += len(job.items)
            else:
                keep.append(job)
        self._pending = keep
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            first = self._pending[0]
            if self.enabled and self.max_wait > 0:
                # Wait for company until the batch is full or the oldest request has waited max_wait.
                while self._queued(first.reasoning) < self.max_batch_size:
                    remaining = first.arrived + self.max_wait - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except TimeoutError:
                        break
            jobs = [j for j in self._take() if not j.future.done()]  # drop requests whose client went away
            if not jobs:
                continue
            items = [it for j in jobs for it in j.items]
            started = time.perf_counter()
            try:
                embeddings, traces = await loop.run_in_executor(self._executor, self.forward, items, first.reasoning)
            except Exception as err:  # the forward failed: every request of the batch gets the error
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            seconds = time.perf_counter() - started
            self.stats.forwards += 1
            self.stats.items += len(items)
            self.stats.largest = max(self.stats.largest, len(items))
            if self.on_batch is not None:
                self.on_batch(len(items), seconds)
            start = 0
            for job in jobs:
                end = start + len(job.items)
                rows: Any = (embeddings[start:end], traces[start:end] if traces is not None else None)
                if not job.future.done():
                    job.future.set_result(rows)
                start = end
