"""What every model's batcher shares in one process: the batch workers and the queue limit.

A batch runs only while it holds one of the shared workers, so several models never run more batches
at once than the machine has workers for (each worker's engine threads are its share of the cores).
Models that wait for a worker get one in the order they asked: a model with work waiting gets the
next worker that comes free, within one batch time, however busy another model keeps the rest.
The queue limit (``--max-queued-pairs``) counts the pairs waiting for every model together.
"""

from __future__ import annotations

import asyncio
from collections import deque


class SharedCapacity:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.busy = 0
        self.queued_pairs = 0  # waiting for any model
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def free(self) -> int:
        """Workers no batch holds and no model waits for."""
        return max(0, self.workers - self.busy - len(self._waiters))

    def grow(self, workers: int) -> None:
        """Make room for a model that runs up to ``workers`` batches at once."""
        self.workers = max(self.workers, workers)
        self._hand_over()

    async def acquire(self) -> None:
        """Wait for a worker, first come first served among the models."""
        if self.busy < self.workers and not self._waiters:
            self.busy += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed over as the wait was cancelled: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.busy -= 1
        self._hand_over()

    def _hand_over(self) -> None:
        while self._waiters and self.busy < self.workers:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.busy += 1
                waiter.set_result(None)
