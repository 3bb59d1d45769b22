"""Several models' batchers sharing the workers and the queue limit."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from sidecar.errors import Overloaded
from sidecar.model.batch import TokenBatch
from sidecar.scheduling.batcher import Batcher, BatchLimits
from sidecar.scheduling.capacity import SharedCapacity
from tests.conftest import wait_until
from tests.scheduling.test_batcher import SumEngine, pair, pairs_of_length


class LoggedEngine(SumEngine):
    """Appends its name to a log shared with other engines at the start of each batch."""

    def __init__(self, name: str, log: list[str], seconds_per_batch: float) -> None:
        super().__init__()
        self.name = name
        self.log = log
        self.seconds_per_batch = seconds_per_batch

    def forward(self, batch: TokenBatch) -> np.ndarray:
        self.log.append(self.name)
        time.sleep(self.seconds_per_batch)
        return super().forward(batch)


def batcher(
    engine: SumEngine, capacity: SharedCapacity, max_batch_pairs: int, max_queued: int = 100
) -> Batcher:
    limits = BatchLimits(4096, max_batch_pairs, max_queued)
    return Batcher(engine, limits, pad_token_id=0, with_token_type_ids=True, capacity=capacity)


async def test_a_model_with_work_waiting_gets_the_next_free_worker():
    log: list[str] = []
    capacity = SharedCapacity(1)
    slow = batcher(LoggedEngine("slow", log, 0.02), capacity, max_batch_pairs=1)
    fast = batcher(LoggedEngine("fast", log, 0.0), capacity, max_batch_pairs=8)
    slow.start()
    fast.start()
    try:
        backlog = asyncio.create_task(slow.score(pairs_of_length(2, 12), None))  # 12 one-pair batches
        await wait_until(lambda: bool(log))
        started_before = len(log)
        scored = await fast.score([pair(1, 2), pair(3, 4)], None)
        np.testing.assert_array_equal(scored.outputs[:, 0], [3, 7])
        # The fast model ran right after the slow batch that held the only worker, ahead of the backlog.
        assert log.index("fast") <= started_before + 1
        assert not backlog.done()
        await backlog
        assert log.count("slow") == 12
    finally:
        await slow.close()
        await fast.close()


async def test_two_models_together_never_run_more_batches_than_the_shared_workers():
    capacity = SharedCapacity(1)
    engines = [SumEngine(), SumEngine()]
    for engine in engines:
        engine.gate.clear()
    batchers = [batcher(engine, capacity, max_batch_pairs=1) for engine in engines]
    for each in batchers:
        each.start()
    try:
        jobs = [asyncio.create_task(each.score(pairs_of_length(2, 2), None)) for each in batchers]
        await asyncio.sleep(0.05)
        assert capacity.busy == 1
        for engine in engines:
            engine.gate.set()
        await asyncio.gather(*jobs)
        assert capacity.busy == 0
    finally:
        for each in batchers:
            await each.close()


async def test_the_queue_limit_counts_the_pairs_waiting_for_every_model():
    capacity = SharedCapacity(1)
    held = SumEngine()
    held.gate.clear()
    first = batcher(held, capacity, max_batch_pairs=1, max_queued=4)
    second = batcher(SumEngine(), capacity, max_batch_pairs=1, max_queued=4)
    first.start()
    second.start()
    try:
        waiting = asyncio.create_task(first.score(pairs_of_length(2, 4), None))  # 1 running, 3 queued
        await asyncio.sleep(0.05)
        assert capacity.queued_pairs == 3
        with pytest.raises(Overloaded, match="3 pairs are queued and this request adds 2"):
            second.admit(2)
        second.admit(1)
        held.gate.set()
        await waiting
        assert capacity.queued_pairs == 0
    finally:
        await first.close()
        await second.close()


async def test_models_share_the_worker_by_time_not_by_batches():
    log: list[str] = []
    capacity = SharedCapacity(1)
    slow = batcher(LoggedEngine("slow", log, 0.03), capacity, max_batch_pairs=1)
    fast = batcher(LoggedEngine("fast", log, 0.01), capacity, max_batch_pairs=1)
    slow.start()
    fast.start()
    try:
        backlogs = [
            asyncio.create_task(slow.score(pairs_of_length(2, 12), None)),
            asyncio.create_task(fast.score(pairs_of_length(2, 36), None)),
        ]
        await asyncio.gather(*backlogs)
        # While both had work, each had about half the worker's time: three fast batches per slow one
        # (batch for batch, the slow model would have had three quarters of it).
        both_waiting = log[:24]
        assert both_waiting.count("fast") >= 2 * both_waiting.count("slow")
    finally:
        await slow.close()
        await fast.close()
