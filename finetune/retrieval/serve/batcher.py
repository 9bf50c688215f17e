"""A micro-batcher: requests that arrive together are embedded together.

The first item to arrive opens a window of at most `max_wait_ms` or `max_batch` items; the window's
items go through ONE call of `embed(items) -> (N, D)` on a worker thread (the event loop never runs
the model), and row i goes back to the request that sent item i. While one batch runs, the next
window fills, so under load batches grow without waiting longer. `max_batch=1` is the unbatched
baseline: one forward per request, one at a time.

When a batched call raises, its items are retried one by one, so a failing item fails only its own
request.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np


class MicroBatcher:
    def __init__(self, embed: Callable[[list], np.ndarray], *, max_batch: int, max_wait_ms: float, name: str = "batch"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.embed, self.max_batch, self.max_wait = embed, max_batch, max_wait_ms / 1000.0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embed-{name}")
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.forwards = self.items = self.largest = 0

    async def submit(self, item) -> np.ndarray:
        """The embedding row (D,) of one item, computed in a batch with whatever arrived with it."""
        loop = asyncio.get_running_loop()
        if self.worker is None or self.worker.done() or self.loop is not loop:  # first use, or a new event loop
            self.loop, self.queue = loop, asyncio.Queue()
            self.worker = loop.create_task(self._run())
        future = loop.create_future()
        await self.queue.put((item, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                try:  # whatever is queued already joins without waiting
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [(item, fut) for item, fut in batch if not fut.cancelled()]  # a client that went away
            if batch:
                await self._embed_batch(loop, batch)

    async def _embed_batch(self, loop, batch) -> None:
        items = [item for item, _ in batch]
        try:
            rows = await loop.run_in_executor(self.executor, self._forward, items)
        except Exception as exc:
            if len(batch) == 1:
                if not batch[0][1].done():
                    batch[0][1].set_exception(exc)
                return
            for one in batch:  # isolate the failing item(s)
                await self._embed_batch(loop, [one])
            return
        for (_, fut), row in zip(batch, rows):
            if not fut.done():
                fut.set_result(row)

    def _forward(self, items: list) -> np.ndarray:
        rows = self.embed(items)  # (N, D)
        if len(rows) != len(items):
            raise RuntimeError(f"embed returned {len(rows)} rows for {len(items)} items")
        self.forwards += 1
        self.items += len(items)
        self.largest = max(self.largest, len(items))
        return rows

    def stats(self) -> dict:
        return {
            "max_batch": self.max_batch,
            "max_wait_ms": self.max_wait * 1000.0,
            "forwards": self.forwards,
            "items": self.items,
            "mean_batch": round(self.items / self.forwards, 2) if self.forwards else None,
            "largest_batch": self.largest,
        }

    async def close(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            try:
                await self.worker
            except (asyncio.CancelledError, Exception):
                pass
        self.executor.shutdown(wait=False)
