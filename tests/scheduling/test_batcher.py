"""The dynamic batcher with a fake engine: packing, fairness, routing and failure, in milliseconds."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest

from sidecar.errors import (
    DeadlineExpired,
    EngineFailure,
    InvalidArgument,
    NonFiniteOutput,
    NotReady,
    Overloaded,
)
from sidecar.model.batch import EncodedPair, ShapeBuckets, TokenBatch
from sidecar.model.engines.base import Engine
from sidecar.scheduling.batcher import Batcher, BatchLimits


class SumEngine(Engine):
    """Each row's output is the sum of its token ids, so every score says which pair it came from."""

    name = "sum"

    def __init__(self) -> None:
        super().__init__(precision="fp32", device="cpu")
        self.shapes: list[tuple[int, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_with: Exception | None = None
        self.side_by_side: threading.Barrier | None = None  # when set, batches must run in pairs
        self.poison: int | None = None  # when set, a row holding this token id gives poison_output
        self.poison_output = np.nan

    def forward(self, batch: TokenBatch) -> np.ndarray:
        self.gate.wait(timeout=30)
        if self.side_by_side is not None:
            self.side_by_side.wait(timeout=10)  # raises BrokenBarrierError unless a second batch runs
        if self.fail_with is not None:
            raise self.fail_with
        self.shapes.append(batch.shape)
        outputs = (batch.input_ids * batch.attention_mask).sum(axis=1, keepdims=True).astype(np.float32)
        if self.poison is not None:
            outputs[(batch.input_ids == self.poison).any(axis=1)] = self.poison_output
        return outputs


def pair(*ids: int) -> EncodedPair:
    return EncodedPair(list(ids), [0] * len(ids))


def pairs_of_length(length: int, count: int, base: int = 1) -> list[EncodedPair]:
    return [pair(*([base + i] * length)) for i in range(count)]


@asynccontextmanager
async def running_batcher(workers: int) -> AsyncIterator[tuple[SumEngine, Batcher]]:
    """A started batcher over a SumEngine; with several workers, the engine requires them side by side."""
    engine = SumEngine()
    if workers > 1:
        engine.side_by_side = threading.Barrier(workers)
    limits = BatchLimits(64, 8, 100)
    batcher = Batcher(engine, limits, pad_token_id=0, with_token_type_ids=True, workers=workers)
    batcher.start()
    try:
        yield engine, batcher
    finally:
        engine.gate.set()
        if engine.side_by_side is not None:
            engine.side_by_side.abort()
        await batcher.close()


@pytest.fixture
async def engine_and_batcher():
    async with running_batcher(workers=1) as running:
        yield running


async def test_outputs_come_back_row_for_row(engine_and_batcher):
    _, batcher = engine_and_batcher
    pairs = [pair(1, 2), pair(10), pair(3, 3, 3)]
    scored = await batcher.score(pairs, deadline=None)
    assert scored.outputs[:, 0].tolist() == [3, 10, 9]
    assert scored.batches == 1


async def test_batches_respect_the_padded_token_budget_and_pair_limit(engine_and_batcher):
    engine, batcher = engine_and_batcher
    engine.gate.clear()
    jobs = [
        batcher.submit(pairs_of_length(4, 10), None),
        batcher.submit(pairs_of_length(30, 3), None),
        batcher.submit(pairs_of_length(12, 5), None),
    ]
    engine.gate.set()
    await asyncio.gather(*(job.future for job in jobs))
    for rows, columns in engine.shapes:
        assert rows <= 8
        assert rows * columns <= 64
    assert sum(rows for rows, _ in engine.shapes) == 18


async def test_similar_lengths_are_grouped_to_cut_padding(engine_and_batcher):
    engine, batcher = engine_and_batcher
    engine.gate.clear()
    mixed = [pair(*([7] * (12 if i % 2 == 0 else 2))) for i in range(8)]  # alternating long and short
    job = batcher.submit(mixed, None)
    engine.gate.set()
    await job.future
    # The four long pairs run together (one short one fills the spare slot), then the short ones,
    # instead of every short pair padded to the long length.
    assert engine.shapes == [(5, 12), (3, 2)]


async def test_the_oldest_pair_always_runs_next(engine_and_batcher):
    engine, batcher = engine_and_batcher
    engine.gate.clear()
    blocker = batcher.submit([pair(1)], None)
    await asyncio.sleep(0.05)  # the blocker is in the model now
    old_long = batcher.submit([pair(*([5] * 60))], None)
    young_short = batcher.submit(pairs_of_length(2, 8, base=100), None)
    engine.gate.set()
    await asyncio.gather(blocker.future, old_long.future, young_short.future)
    assert engine.shapes[1] == (1, 60)  # not starved by the stream of short pairs


async def test_many_jobs_share_batches_and_get_their_own_scores(engine_and_batcher):
    engine, batcher = engine_and_batcher
    engine.gate.clear()
    jobs = [batcher.submit([pair(job_id, row) for row in range(3)], None) for job_id in range(1, 11)]
    engine.gate.set()
    await asyncio.gather(*(job.future for job in jobs))
    for job_id, job in enumerate(jobs, start=1):
        assert job.outputs[:, 0].tolist() == [job_id + row for row in range(3)]
    assert len(engine.shapes) < len(jobs)


async def test_overload_is_refused_without_queueing(engine_and_batcher):
    engine, batcher = engine_and_batcher
    engine.gate.clear()
    queued = batcher.submit(pairs_of_length(1, 90), None)
    with pytest.raises(Overloaded, match="at capacity"):
        batcher.submit(pairs_of_length(1, 20), None)
    with pytest.raises(InvalidArgument, match="more than the server queues at once"):
        batcher.submit(pairs_of_length(1, 101), None)
    assert batcher.queued_pairs == 90
    engine.gate.set()
    await queued.future


async def test_expired_and_cancelled_work_is_dropped_before_the_model(engine_and_batcher):
    engine, batcher = engine_and_batcher
    engine.gate.clear()
    blocker = batcher.submit([pair(1)], None)
    await asyncio.sleep(0.05)
    expired = batcher.submit([pair(99, 99)], deadline=time.monotonic() + 0.01)
    cancelled_task = asyncio.create_task(batcher.score([pair(98, 98, 98)], None))
    await asyncio.sleep(0.05)
    cancelled_task.cancel()
    await asyncio.sleep(0)
    engine.gate.set()
    await blocker.future
    with pytest.raises(DeadlineExpired):
        await expired.future
    with pytest.raises(asyncio.CancelledError):
        await cancelled_task
    await batcher.score([pair(2)], None)
    assert engine.shapes == [(1, 1), (1, 1)]
    assert batcher.queued_pairs == 0


async def test_a_cancelled_caller_frees_the_queue_at_once(engine_and_batcher):
    engine, batcher = engine_and_batcher
    engine.gate.clear()
    blocker = batcher.submit([pair(1)], None)
    await asyncio.sleep(0.05)  # the blocker holds the model thread; what follows waits in the queue
    leaving = asyncio.create_task(batcher.score(pairs_of_length(1, 60, base=10), None))
    await asyncio.sleep(0)
    assert batcher.queued_pairs == 60
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    # Freed before any batch is formed: the model thread is still held.
    assert batcher.queued_pairs == 0
    assert not blocker.finished
    batcher.admit(100)  # a new caller may use the whole queue again
    engine.gate.set()
    await blocker.future
    assert engine.shapes == [(1, 1)]


async def test_a_caller_cancelled_as_its_job_finishes_stays_cancelled(engine_and_batcher, monkeypatch):
    """The cancellation and the outputs arrive in one loop turn: the caller must see the cancellation
    (asyncio.wait_for in Python 3.11 swallowed it and returned the outputs)."""
    _, batcher = engine_and_batcher
    jobs = []
    submit = batcher.submit

    def submit_and_keep(*args):
        jobs.append(submit(*args))
        return jobs[-1]

    monkeypatch.setattr(batcher, "submit", submit_and_keep)
    caller = asyncio.create_task(batcher.score([pair(1, 2)], deadline=time.monotonic() + 30))
    await asyncio.sleep(0)
    jobs[0].future.add_done_callback(lambda _: caller.cancel())
    with pytest.raises(asyncio.CancelledError):
        await caller


async def test_a_passed_deadline_frees_the_queue_at_once_and_fails_the_call(engine_and_batcher):
    engine, batcher = engine_and_batcher
    engine.gate.clear()
    blocker = batcher.submit([pair(1)], None)
    await asyncio.sleep(0.05)
    with pytest.raises(DeadlineExpired, match="deadline passed"):
        await batcher.score(pairs_of_length(1, 60, base=10), deadline=time.monotonic() + 0.05)
    assert batcher.queued_pairs == 0
    assert not blocker.finished  # freed while the model was still busy, not at the next batch
    engine.gate.set()
    await blocker.future
    assert engine.shapes == [(1, 1)]


async def test_a_non_finite_output_fails_only_its_own_request(engine_and_batcher):
    engine, batcher = engine_and_batcher
    reported: list[tuple[str, int]] = []
    batcher._on_non_finite = lambda failed_engine, rows: reported.append((failed_engine.name, rows))
    engine.gate.clear()
    engine.poison = 13
    poisoned = asyncio.create_task(batcher.score([pair(13), pair(2), pair(13, 1)], None))
    healthy = asyncio.create_task(batcher.score([pair(3), pair(4)], None))
    await asyncio.sleep(0.05)
    engine.gate.set()
    with pytest.raises(NonFiniteOutput, match="2 of this request's 3 rows") as raised:
        await poisoned
    assert isinstance(raised.value, EngineFailure)  # an internal error to the caller
    assert (await healthy).outputs[:, 0].tolist() == [3, 4]
    assert len(engine.shapes) == 1  # both requests shared the batch
    assert reported == [("sum", 2)]
    assert batcher.queued_pairs == 0
    # The engine stays in service: the next request is scored by it.
    assert (await batcher.score([pair(5)], None)).outputs[0, 0] == 5


async def test_infinite_outputs_are_not_served_either(engine_and_batcher):
    engine, batcher = engine_and_batcher
    engine.poison, engine.poison_output = 7, np.inf
    with pytest.raises(NonFiniteOutput):
        await batcher.score([pair(7)], None)


async def test_an_engine_failure_reaches_every_job_in_the_batch(engine_and_batcher):
    engine, batcher = engine_and_batcher
    engine.gate.clear()
    engine.fail_with = RuntimeError("boom")
    jobs = [batcher.submit([pair(i)], None) for i in range(3)]
    engine.gate.set()
    for job in jobs:
        with pytest.raises(EngineFailure, match="boom"):
            await job.future
    engine.fail_with = None
    assert (await batcher.score([pair(4)], None)).outputs[0, 0] == 4


async def test_close_fails_waiting_work():
    engine = SumEngine()
    engine.gate.clear()
    batcher = Batcher(engine, BatchLimits(64, 1, 100), pad_token_id=0, with_token_type_ids=False)
    batcher.start()
    in_flight = batcher.submit([pair(1)], None)
    await asyncio.sleep(0.05)
    waiting = batcher.submit([pair(2)], None)
    threading.Timer(0.2, engine.gate.set).start()  # close waits for the model thread to come back
    await batcher.close()
    for job in (in_flight, waiting):
        with pytest.raises(NotReady):
            await job.future
    with pytest.raises(NotReady):
        batcher.submit([pair(3)], None)


@pytest.fixture
async def two_worker_batcher():
    async with running_batcher(workers=2) as running:
        yield running


async def test_two_workers_run_two_batches_at_once(two_worker_batcher):
    engine, batcher = two_worker_batcher
    first, second = pairs_of_length(4, 8, base=1), pairs_of_length(4, 8, base=100)
    results = await asyncio.gather(batcher.score(first, None), batcher.score(second, None))
    assert results[0].outputs[:, 0].tolist() == [4 * (1 + i) for i in range(8)]
    assert results[1].outputs[:, 0].tolist() == [4 * (100 + i) for i in range(8)]
    assert sorted(engine.shapes) == [(8, 4), (8, 4)]


async def test_a_small_request_is_shared_out_among_idle_workers(two_worker_batcher):
    engine, batcher = two_worker_batcher
    scored = await batcher.score([pair(1), pair(2, 2), pair(3), pair(4, 4), pair(5), pair(6)], None)
    assert scored.outputs[:, 0].tolist() == [1, 4, 3, 8, 5, 6]
    assert scored.batches == 2
    assert sorted(rows for rows, _ in engine.shapes) == [3, 3]


async def test_an_engine_that_runs_one_batch_at_a_time_gets_one_worker():
    class OneAtATime(SumEngine):
        concurrent_forward = False

    with pytest.raises(ValueError, match="runs one batch at a time"):
        Batcher(OneAtATime(), BatchLimits(64, 8, 100), pad_token_id=0, with_token_type_ids=True, workers=2)


async def test_the_scored_rows_cannot_be_changed_by_their_caller(engine_and_batcher):
    _, batcher = engine_and_batcher
    scored = await batcher.score([pair(1)], None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        scored.batches = 7  # type: ignore[misc]


async def test_an_engine_built_for_shape_buckets_gets_each_batch_padded_to_one():
    engine = SumEngine()
    engine.shape_buckets = ShapeBuckets(max_batch_pairs=8, max_batch_tokens=64, max_length=32)
    counted: list[tuple[int, int]] = []
    batcher = Batcher(
        engine,
        BatchLimits(64, 8, 100),
        pad_token_id=0,
        with_token_type_ids=True,
        on_batch=lambda pairs, tokens: counted.append((pairs, tokens)),
    )
    batcher.start()
    try:
        sent = [pairs_of_length(3, 5, base=1), pairs_of_length(11, 1, base=50)]
        results = [await batcher.score(pairs, None) for pairs in sent]
    finally:
        await batcher.close()
    # 5 rows of 3 tokens run as the (8, 8) bucket, 1 row of 11 as (2, 16); padding rows are dropped.
    assert engine.shapes == [(8, 8), (2, 16)]
    assert results[0].outputs[:, 0].tolist() == [3.0 * (1 + i) for i in range(5)]
    assert results[1].outputs[:, 0].tolist() == [11.0 * 50]
    assert counted == [(5, 64), (1, 32)]  # real pairs, and the tokens the engine ran, padding included


async def test_a_replacing_engine_serves_the_next_batches_and_both_are_closed_with_the_batcher():
    class ClosingEngine(SumEngine):
        def __init__(self) -> None:
            super().__init__()
            self.closed = False

        def close(self) -> None:
            self.closed = True

    first, second = ClosingEngine(), ClosingEngine()
    batcher = Batcher(first, BatchLimits(64, 8, 100), pad_token_id=0, with_token_type_ids=True)
    batcher.start()
    await batcher.score([pair(1, 2)], None)
    batcher.replace_engine(second)
    scored = await batcher.score([pair(3, 4)], None)
    assert scored.outputs[0, 0] == 7
    assert (len(first.shapes), len(second.shapes)) == (1, 1)
    assert not first.closed  # a batch still running on it may finish
    await batcher.close()
    assert (first.closed, second.closed) == (True, True)


class ScratchEngine(SumEngine):
    """Counts how often it gave back its scratch memory, and fails if that happens during a forward."""

    def __init__(self) -> None:
        super().__init__()
        self.releases = 0
        self.forwards_running = 0

    def forward(self, batch: TokenBatch) -> np.ndarray:
        self.forwards_running += 1
        try:
            return super().forward(batch)
        finally:
            self.forwards_running -= 1

    def release_scratch(self) -> None:
        assert self.forwards_running == 0, "scratch released while a batch ran"
        self.releases += 1


async def test_an_idle_model_gives_back_its_scratch_memory_once_until_it_works_again():
    engine = ScratchEngine()
    batcher = Batcher(
        engine, BatchLimits(64, 8, 100), pad_token_id=0, with_token_type_ids=True, idle_release_s=0.05
    )
    batcher.start()
    try:
        await asyncio.sleep(0.2)
        assert engine.releases == 0  # nothing ran yet, so there is nothing to give back
        engine.gate.clear()  # the first batch runs for longer than the idle time
        scoring = asyncio.create_task(batcher.score(pairs_of_length(4, 2), None))
        await asyncio.sleep(0.2)
        assert engine.releases == 0  # a running batch is not idleness
        engine.gate.set()
        await scoring
        await asyncio.sleep(0.3)
        assert engine.releases == 1
        await asyncio.sleep(0.2)
        assert engine.releases == 1  # once per busy spell
        await batcher.score(pairs_of_length(4, 1), None)
        await asyncio.sleep(0.3)
        assert engine.releases == 2
    finally:
        await batcher.close()


async def test_asked_to_release_soon_it_gives_back_its_scratch_memory_once_its_batches_end():
    engine = ScratchEngine()
    batcher = Batcher(
        engine, BatchLimits(64, 8, 100), pad_token_id=0, with_token_type_ids=True, idle_release_s=60.0
    )
    batcher.start()
    try:
        batcher.release_scratch_soon()
        await asyncio.sleep(0.1)
        assert engine.releases == 0  # nothing ran yet, so there is nothing to give back
        await batcher.score(pairs_of_length(4, 2), None)
        batcher.release_scratch_soon()
        await asyncio.sleep(0.1)
        assert engine.releases == 1  # without waiting the idle time
        engine.gate.clear()
        scoring = asyncio.create_task(batcher.score(pairs_of_length(4, 2), None))
        await asyncio.sleep(0.1)
        batcher.release_scratch_soon()
        await asyncio.sleep(0.1)
        assert engine.releases == 1  # never while a batch runs
        engine.gate.set()
        await scoring
        await asyncio.sleep(0.1)
        assert engine.releases == 2  # as soon as it ended
        await batcher.score(pairs_of_length(4, 1), None)
        await asyncio.sleep(0.2)
        assert engine.releases == 2  # the next busy spell waits for the idle time again
    finally:
        await batcher.close()


@pytest.mark.parametrize("asked_to_release_soon", [False, True])
async def test_with_no_idle_release_the_scratch_memory_is_kept(asked_to_release_soon: bool):
    engine = ScratchEngine()
    batcher = Batcher(engine, BatchLimits(64, 8, 100), pad_token_id=0, with_token_type_ids=True)
    batcher.start()
    try:
        await batcher.score(pairs_of_length(4, 2), None)
        if asked_to_release_soon:
            batcher.release_scratch_soon()
        await asyncio.sleep(0.2)
        assert engine.releases == 0
    finally:
        await batcher.close()


async def test_an_engine_that_cannot_give_back_its_scratch_memory_keeps_serving(caplog):
    class Refusing(ScratchEngine):
        def release_scratch(self) -> None:
            super().release_scratch()
            raise RuntimeError("busy")

    engine = Refusing()
    batcher = Batcher(
        engine, BatchLimits(64, 8, 100), pad_token_id=0, with_token_type_ids=True, idle_release_s=0.05
    )
    batcher.start()
    try:
        await batcher.score(pairs_of_length(4, 1), None)
        await asyncio.sleep(0.3)
        assert engine.releases == 1
        assert "could not give back its scratch memory" in caplog.text
        scored = await batcher.score(pairs_of_length(4, 2, base=5), None)
        assert [float(row[0]) for row in scored.outputs] == [20.0, 24.0]
    finally:
        await batcher.close()


async def test_the_length_sorted_queue_stays_whole_through_random_arrivals_departures_and_batches():
    """The queue is kept sorted by length as pairs arrive, leave and are batched; every batch must still
    be a window of the queued pairs in that order around the oldest one, within the limits."""
    rng = np.random.default_rng(7)
    limits = BatchLimits(max_batch_tokens=600, max_batch_pairs=12, max_queued_pairs=10_000)
    batcher = Batcher(SumEngine(), limits, pad_token_id=0, with_token_type_ids=True)
    queued: dict[int, tuple[object, int, int]] = {}  # the test's own account: sequence -> (job, row, length)
    jobs = []
    batched: set[tuple[int, int]] = set()
    sequence = 0
    for _ in range(300):
        action = rng.random()
        if action < 0.35:
            lengths = rng.integers(1, 80, size=rng.integers(1, 30))
            job = batcher.submit([pair(*([1] * int(length))) for length in lengths], None)
            jobs.append(job)
            for row, length in enumerate(lengths):
                queued[sequence] = (job, row, int(length))
                sequence += 1
        elif action < 0.45 and jobs:
            job = jobs[int(rng.integers(len(jobs)))]
            batcher._withdraw(job)
            queued = {key: value for key, value in queued.items() if value[0] is not job}
        else:
            batch = batcher._next_batch(idle_workers=int(rng.integers(1, 4)))
            if not queued:
                assert batch == []
                continue
            oldest = min(queued)
            assert oldest in {item.sequence for item in batch}
            longest = max(item.length for item in batch)
            assert len(batch) <= limits.max_batch_pairs
            assert len(batch) == 1 or len(batch) * longest <= limits.max_batch_tokens
            orders = sorted((length, key) for key, (_, _, length) in queued.items())
            window = [(item.length, item.sequence) for item in batch]
            start = orders.index(window[0])
            assert orders[start : start + len(window)] == window  # contiguous, in length order
            for item in batch:
                assert (id(item.job), item.row) not in batched
                batched.add((id(item.job), item.row))
                del queued[item.sequence]
        assert batcher.queued_pairs == len(queued)
    await batcher.close()
