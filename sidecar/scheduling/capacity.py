"""What every model's batcher shares in one process: the batch workers and the queue limit.

A batch runs only while it holds one of the shared workers, so several models never run more batches
at once than the machine has workers for (each worker's engine threads are its share of the cores).
When several models wait for a worker, the next one free goes to the model that has had the fewest
worker-seconds: fair queueing by time, not by batches, since a model with slow batches would otherwise
take most of the machine from one with fast batches. A model that was idle starts level with the
least served of the busy ones, so idle time earns no credit to crowd the others out later. So a model
with work waiting gets a worker within about one batch time, however busy another keeps the rest.
The queue limit (``--max-queued-pairs``) counts the pairs waiting for every model together.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Waiter:
    owner: object
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class SharedCapacity:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.busy = 0
        self.queued_pairs = 0  # waiting for any model
        self._waiters: list[_Waiter] = []
        # Per model (its batcher): worker-seconds had, the fairness measure, and batches running.
        self._used: dict[object, float] = {}
        self._running: Counter[object] = Counter()
        # Models whose batch just ended: the worker is handed over on the loop's next turn, once each
        # of them has asked again for its next batch, so the choice is made among all who want it.
        self._released: set[object] = set()

    @property
    def free(self) -> int:
        """Workers no batch holds and no model waits for."""
        return max(0, self.workers - self.busy - len(self._waiters))

    def grow(self, workers: int) -> None:
        """Make room for a model that runs up to ``workers`` batches at once."""
        self.workers = max(self.workers, workers)
        self._hand_over()

    async def acquire(self, owner: object) -> None:
        """Wait for a worker for ``owner``'s next batch."""
        if not self._running[owner] and owner not in self._released:
            self._level(owner)
        if self.busy < self.workers and not self._waiters and not self._released:
            self._take(owner)
            return
        waiter = _Waiter(owner)
        self._waiters.append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(owner, 0.0)  # handed over as the wait was cancelled: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self, owner: object, seconds: float) -> None:
        """Give back ``owner``'s worker after a batch of ``seconds``."""
        self._used[owner] = self._used.get(owner, 0.0) + seconds
        self._running[owner] -= 1
        self.busy -= 1
        if not self._released:
            asyncio.get_running_loop().call_soon(self._hand_over)
        self._released.add(owner)

    def _level(self, owner: object) -> None:
        """Bring a model back from idle level with the least served of the busy ones."""
        busy = {waiter.owner for waiter in self._waiters} | {other for other, n in self._running.items() if n}
        busy.discard(owner)
        if busy:
            floor = min(self._used.get(other, 0.0) for other in busy)
            self._used[owner] = max(self._used.get(owner, 0.0), floor)

    def _take(self, owner: object) -> None:
        self.busy += 1
        self._running[owner] += 1

    def _hand_over(self) -> None:
        self._released.clear()
        while self._waiters and self.busy < self.workers:
            # The least served first; among equals, the longest waiting (the list is in arrival order).
            waiter = min(self._waiters, key=lambda each: self._used.get(each.owner, 0.0))
            self._waiters.remove(waiter)
            if not waiter.future.done():
                self._take(waiter.owner)
                waiter.future.set_result(None)
