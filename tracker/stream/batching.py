"""Micro-batching that forms each batch when the worker is free to run it.

Concurrent callers ``await batcher.submit(item)``; one worker runs ``run(items)`` over up to
``max_batch_size`` queued items at a time and hands each caller its result. The batch is formed
when the previous one has finished, so everything that arrived while the model was busy goes into
the next forward: under load, batches grow to absorb the queue.

Ray Serve's ``@serve.batch`` forms a batch as soon as its first item has waited
``batch_wait_timeout_s`` and queues it behind the running one (``_process_batches`` does not wait
for the batch it started). Under load every batch then holds one item and items wait for a chain of
single-item forwards: at 32 calls, 177 forwards for 176 utterances with up to 20 utterances waiting
inside the replica (BENCHMARKS.md, "Batches formed when the model is free"). The EmotionModel, the
FeatureExtractor's recognizer and the in-process pipeline use this instead.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Generic, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class Batcher(Generic[T, R]):
    """Gathers concurrent ``submit`` calls into batches for ``run``, one batch at a time.

    ``run(items)`` returns one result per item, in order; if it raises, every caller in that batch
    gets the exception and the worker goes on with the next batch. ``wait_s`` is how long the first
    item of a batch may wait for company, counted from its arrival: an item that already waited
    behind a running batch does not wait again. A caller that gave up (its task was cancelled) is
    left out of the batch it would have joined. ``max_batch_size`` and ``wait_s`` may be changed
    while it serves.
    """

    def __init__(self, run: Callable[[list[T]], Awaitable[Sequence[R]]], max_batch_size: int = 8,
                 wait_s: float = 0.01):
        if max_batch_size < 1 or wait_s < 0:
            raise ValueError("max_batch_size must be >= 1 and wait_s >= 0")
        self.run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.batches = 0  # batches run
        self.items = 0  # items in them
        self._pending: deque[_Pending[T]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None  # the event and worker below belong to it
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first use, or used from another event loop (e.g. a later asyncio.run)
            self._loop, self._arrived, self._worker = loop, asyncio.Event(), None
            self._pending = deque(p for p in self._pending if p.future.get_loop() is loop)
        pending = _Pending(item, loop.create_future())
        self._pending.append(pending)
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        return await pending.future

    async def _work(self) -> None:
        try:
            await self._batches()
        except BaseException as exc:  # the worker itself failed (or its loop is closing): nobody may wait forever
            for p in self._pending:
                if not p.future.done():
                    p.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("batcher stopped"))
            self._pending.clear()
            raise

    async def _batches(self) -> None:
        assert self._arrived is not None
        while self._pending:
            await self._fill()
            batch = self._take()
            if not batch:
                continue
            self.batches += 1
            self.items += len(batch)
            try:
                results = await self.run([p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch of {len(batch)} items returned {len(results)} results")
            except Exception as exc:  # noqa: BLE001 - the callers of this batch get it, the worker goes on
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, result in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(result)

    async def _fill(self) -> None:
        """Wait until the batch is full or its first item has waited ``wait_s``."""
        assert self._arrived is not None
        while len(self._pending) < self.max_batch_size:
            left = self._pending[0].arrived + self.wait_s - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[_Pending[T]]:
        batch: list[_Pending[T]] = []
        while self._pending and len(batch) < self.max_batch_size:
            p = self._pending.popleft()
            if not p.future.cancelled():
                batch.append(p)
        return batch
