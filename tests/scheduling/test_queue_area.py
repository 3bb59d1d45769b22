"""The queue's depth integrated over time: the counter autoscalers read as the mean queue depth."""

from __future__ import annotations

import asyncio

from sidecar.scheduling.batcher import QueueArea
from tests.scheduling.test_batcher import pairs_of_length, running_batcher


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_area_is_depth_times_time_between_changes():
    clock = FakeClock()
    area = QueueArea(clock)
    clock.now += 5.0  # empty: nothing accrues
    area.set_depth(10)
    clock.now += 2.0
    assert area.pair_seconds == 20.0  # read between changes: the open interval counts
    area.set_depth(4)
    clock.now += 0.5
    area.set_depth(0)
    clock.now += 7.0
    assert area.pair_seconds == 22.0
    assert area.depth == 0


async def test_batcher_integrates_the_pairs_waiting_and_stops_when_the_queue_empties():
    async with running_batcher(workers=1) as (engine, batcher):
        engine.gate.clear()  # the first batch holds the one model thread; the rest wait
        job = batcher.submit(pairs_of_length(1, 40), None)
        await asyncio.sleep(0.01)
        waiting = batcher.queued_pairs
        assert waiting == 40 - 8  # one batch of --max-batch-pairs 8 left the queue for the model
        before = batcher.queued_pair_seconds
        await asyncio.sleep(0.05)
        assert batcher.queued_pair_seconds - before >= waiting * 0.05
        engine.gate.set()
        await job.future
        drained = batcher.queued_pair_seconds
        await asyncio.sleep(0.02)
        assert batcher.queued_pair_seconds == drained
