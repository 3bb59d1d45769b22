"""The dynamic batcher: every caller's pairs share one bounded queue and a few model threads.

Batches are packed under a token budget counted with padding (longest pair x pairs). The oldest
waiting pair always goes into the next batch, so nothing starves; the rest of the batch is the
window of pairs closest to it in length, so little of the batch is padding. A request's pairs may
span several batches and one batch may mix many requests; each request owns a ``ScoringJob`` whose
rows are filled in place, so a score can only land in its own job at its own position.

With several workers, that many batches run at once, each on its own model thread; when fewer pairs
wait than fill the idle workers, they are shared out among them, so a small request still uses
every worker instead of queueing as one batch on one thread. Several models' batchers share the
workers and the queue limit (``SharedCapacity``).

A caller that leaves (cancelled, or its deadline passed) takes its pairs out of the queue at once, so
they stop counting toward ``max_queued_pairs``. An output that is not finite (NaN or infinity) is never
delivered: its request fails with ``NonFiniteOutput`` and ``on_non_finite`` hears of it; the engine
keeps serving the other requests (see ``NonFiniteOutput``).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import itertools
import logging
import math
import operator
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from sidecar.errors import (
    DeadlineExpired,
    EngineFailure,
    InvalidArgument,
    NonFiniteOutput,
    NotReady,
    Overloaded,
    ServingError,
)
from sidecar.model.batch import EncodedPair, TokenBatch, collate
from sidecar.model.engines.base import Engine
from sidecar.model.memory import release_unused_memory
from sidecar.scheduling.capacity import SharedCapacity

logger = logging.getLogger(__name__)

_by_order = operator.attrgetter("order")


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_batch_tokens: int
    max_batch_pairs: int
    max_queued_pairs: int


@dataclass(frozen=True, slots=True)
class ScoredRows:
    """What ``Batcher.score`` hands back: one output per pair, row for row, and how they were run."""

    outputs: np.ndarray
    batches: int
    queue_ns: int
    inference_ns: int


@dataclass(eq=False)
class ScoringJob:
    """One request's pairs on their way through the queue, and the timings they collect."""

    pairs: Sequence[EncodedPair]
    deadline: float | None  # time.monotonic() seconds
    future: asyncio.Future[np.ndarray]
    outputs: np.ndarray | None = None
    remaining: int = 0
    enqueued_ns: int = field(default_factory=time.monotonic_ns)
    first_batch_ns: int = 0
    last_batch_done_ns: int = 0
    batches: int = 0

    @property
    def finished(self) -> bool:
        return self.future.done()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    @property
    def queue_ns(self) -> int:
        return self.first_batch_ns - self.enqueued_ns if self.first_batch_ns else 0

    @property
    def inference_ns(self) -> int:
        return self.last_batch_done_ns - self.first_batch_ns if self.first_batch_ns else 0

    def scored_rows(self) -> ScoredRows:
        """The finished job's outputs and timings (only once its future holds them)."""
        return ScoredRows(self.future.result(), self.batches, self.queue_ns, self.inference_ns)


@dataclass(slots=True, eq=False)
class _QueuedPair:
    job: ScoringJob
    row: int
    length: int
    sequence: int
    queued: bool = True  # False once batched or dropped; the arrival order forgets it lazily
    order: tuple[int, int] = field(init=False)  # its place in the queue: by length, ties by arrival

    def __post_init__(self) -> None:
        self.order = (self.length, self.sequence)


class QueueArea:
    """The queue's depth integrated over time, in pair-seconds: its increase over any window, divided by
    the window, is the mean depth there, however seldom it is read (the metrics thread reads it)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._pair_seconds = 0.0
        self._depth = 0
        self._since = clock()

    @property
    def depth(self) -> int:
        return self._depth

    def set_depth(self, depth: int) -> None:
        with self._lock:
            now = self._clock()
            self._pair_seconds += self._depth * (now - self._since)
            self._depth, self._since = depth, now

    @property
    def pair_seconds(self) -> float:
        with self._lock:
            return self._pair_seconds + self._depth * (self._clock() - self._since)


class Batcher:
    def __init__(
        self,
        engine: Engine,
        limits: BatchLimits,
        *,
        pad_token_id: int,
        with_token_type_ids: bool,
        workers: int = 1,
        on_batch: Callable[[int, int], None] | None = None,
        on_non_finite: Callable[[Engine, int], None] | None = None,
        capacity: SharedCapacity | None = None,
        idle_release_s: float = 0.0,
    ) -> None:
        if workers > 1 and not engine.concurrent_forward:
            raise ValueError(f"the {engine.name} engine runs one batch at a time, not {workers}")
        # The engine serving now, held here alone; a compiled one may take over (``replace_engine``).
        self.engine = engine
        self._replaced_engines: list[Engine] = []
        self.workers = workers
        self._on_batch = on_batch  # (pairs, padded tokens) of each batch, for metrics
        # (the engine, the rows it gave non-finite outputs for) of each request failed for them
        self._on_non_finite = on_non_finite
        self.limits = limits
        # The workers and the queue limit this batcher shares with the other models' (its own if none).
        self._capacity = capacity if capacity is not None else SharedCapacity(workers)
        self._capacity.grow(workers)
        self._pad_token_id = pad_token_id
        self._with_token_type_ids = with_token_type_ids
        # The queue, by length (``_QueuedPair.order``): a batch is a window of it. Its arrival order
        # (with pairs no longer queued left in, until they reach the front), and its pairs per job.
        self._queue: list[_QueuedPair] = []
        self._arrivals: collections.deque[_QueuedPair] = collections.deque()
        self._queued_jobs: dict[ScoringJob, int] = {}
        self._queue_area = QueueArea()
        self._sequence = itertools.count()
        self._work_available = asyncio.Event()
        self._model_threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="model")
        self._running: set[asyncio.Task[None]] = set()  # batches on the model threads
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        # After this long with nothing queued or running, the engine gives its scratch memory back; 0
        # keeps it. Whether a batch ran since it last did.
        self._idle_release_s = idle_release_s
        self._scratch_held = False
        self._release_soon = False

    @property
    def queued_pairs(self) -> int:
        return self._queued_pairs

    @property
    def queued_pair_seconds(self) -> float:
        """Pairs queued, integrated over time since the batcher was made (see ``QueueArea``)."""
        return self._queue_area.pair_seconds

    @property
    def _queued_pairs(self) -> int:
        return self._queue_area.depth

    @_queued_pairs.setter
    def _queued_pairs(self, depth: int) -> None:  # every change of the depth is integrated
        self._capacity.queued_pairs += depth - self._queue_area.depth
        self._queue_area.set_depth(depth)

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    def replace_engine(self, engine: Engine) -> None:
        """Run the next batches on ``engine``; batches already running finish on the one it replaces,
        which is closed with the batcher."""
        self._replaced_engines.append(self.engine)
        self.engine = engine

    async def close(self) -> None:
        """Fail whatever still waits, stop the loop, and release the model threads and the engines."""
        self._closed = True
        tasks = [task for task in (self._loop_task, *self._running) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for job in self._queued_jobs:
            self._fail(job, NotReady("the server is shutting down"))
        self._keep_queued(lambda queued: False)
        self._model_threads.shutdown(wait=True)
        for engine in (self.engine, *self._replaced_engines):
            engine.close()

    async def score(self, pairs: Sequence[EncodedPair], deadline: float | None) -> ScoredRows:
        """Queue the pairs and wait for their outputs, row for row.

        Raises Overloaded at once when the queue cannot take them, DeadlineExpired when the deadline
        passes first. When the deadline passes or the caller is cancelled, its pairs still queued leave
        the queue at once, before they reach the model.
        """
        job = self.submit(pairs, deadline)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            # Not wait_for: under Python 3.11 it can swallow the caller's cancellation when the job
            # finishes in the same loop turn. The shield leaves the job to _withdraw.
            async with asyncio.timeout(timeout):
                await asyncio.shield(job.future)
        except TimeoutError:
            self._withdraw(job)
            raise DeadlineExpired("the deadline passed before the request's pairs were scored") from None
        except asyncio.CancelledError:
            self._withdraw(job)
            raise
        return job.scored_rows()

    def admit(self, pairs: int) -> None:
        """Raise Overloaded unless the queue has room for ``pairs`` more, InvalidArgument where it
        never will.

        Callers check before tokenizing too (with the document count, a lower bound of the pairs),
        so a refusal under overload costs next to nothing and leaves the CPU to the model.
        """
        if self._closed:
            raise NotReady("the server is shutting down")
        limit = self.limits.max_queued_pairs
        if pairs > limit:  # no wait makes room for it: the caller's to change, not to retry
            raise InvalidArgument(
                f"this request needs {pairs} model pairs, more than the server queues at once "
                f"({limit}, --max-queued-pairs); send fewer documents or chunks per request"
            )
        queued = self._capacity.queued_pairs  # every model's, as the limit counts them
        if queued + pairs > limit:
            raise Overloaded(
                f"the server is at capacity: {queued} pairs are queued and this request adds {pairs}, "
                f"over the limit of {limit}; retry with backoff"
            )

    def submit(self, pairs: Sequence[EncodedPair], deadline: float | None) -> ScoringJob:
        if not pairs:
            raise ValueError("a scoring job needs at least one pair")
        self.admit(len(pairs))
        job = ScoringJob(pairs=pairs, deadline=deadline, future=asyncio.get_running_loop().create_future())
        job.remaining = len(pairs)
        for row, pair in enumerate(pairs):
            queued = _QueuedPair(job, row, len(pair), next(self._sequence))
            self._arrivals.append(queued)
            bisect.insort(self._queue, queued, key=_by_order)
        self._queued_jobs[job] = len(pairs)
        self._queued_pairs += len(pairs)
        self._work_available.set()
        return job

    async def _run(self) -> None:
        """Start a batch whenever pairs wait, one of this model's workers is idle, and a shared worker
        is free (see ``SharedCapacity``)."""
        own_workers = asyncio.Semaphore(self.workers)
        while True:
            await own_workers.acquire()
            self._drop_dead_work()
            if not self._queue:
                own_workers.release()
                self._work_available.clear()
                await self._wait_for_work()
                continue
            await self._capacity.acquire(self)
            idle = min(self.workers - len(self._running), 1 + self._capacity.free)
            batch = self._next_batch(idle_workers=idle)
            if not batch:  # every pair left while this model waited for a worker
                self._capacity.release(self, 0.0)
                own_workers.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run_batch(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            task.add_done_callback(partial(self._batch_done, own_workers, time.monotonic()))

    async def _wait_for_work(self) -> None:
        """Wait until pairs are queued. A model idle meanwhile for ``idle_release_s``, with no batch
        queued or running, has its engine give back its scratch memory, once per busy spell: a model
        that is seldom asked, beside a busy one, then holds only its weights. After
        ``release_scratch_soon`` it gives it back as soon as no batch runs."""
        while self._idle_release_s > 0 and self._scratch_held:
            if not self._release_soon or self._running:
                try:
                    # Not wait_for: under Python 3.11 it can swallow close()'s cancellation when work
                    # arrives in the same loop turn, and the loop would then wait forever.
                    async with asyncio.timeout(self._idle_release_s):
                        await self._work_available.wait()
                    return
                except TimeoutError:
                    if self._running:
                        continue  # its last batches still run: idle from when they end
            self._scratch_held = self._release_soon = False
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._model_threads, self._release_scratch, self.engine)
        await self._work_available.wait()

    def release_scratch_soon(self) -> None:
        """Have the engine give back its scratch memory once no batch is queued or running, without
        waiting ``idle_release_s`` (when that is 0, the memory is kept). Start-up asks after the
        warm-up, whose full-length batches are not what traffic needs."""
        if self._idle_release_s > 0 and self._scratch_held:
            self._release_soon = True
            self._work_available.set()  # wakes the loop, which finds nothing queued and waits again

    @staticmethod
    def _release_scratch(engine: Engine) -> None:
        try:
            engine.release_scratch()
        except Exception:  # the memory stays held; serving goes on regardless
            logger.warning(
                "%s/%s could not give back its scratch memory", engine.name, engine.precision, exc_info=True
            )
            return
        release_unused_memory()  # the freed buffers go back to the system, not to glibc's free lists

    def _batch_done(self, own_workers: asyncio.Semaphore, started: float, _: asyncio.Task[None]) -> None:
        own_workers.release()
        self._capacity.release(self, time.monotonic() - started)
        if self._release_soon:
            self._work_available.set()  # the release waited for this batch to end

    async def _run_batch(self, batch: list[_QueuedPair]) -> None:
        self._scratch_held = True
        pairs = [queued.job.pairs[queued.row] for queued in batch]
        started = time.monotonic_ns()
        for job in {queued.job for queued in batch}:
            job.first_batch_ns = job.first_batch_ns or started
        loop = asyncio.get_running_loop()
        try:
            engine, outputs = await loop.run_in_executor(self._model_threads, self._forward, pairs)
        except asyncio.CancelledError:  # the batcher is closing under this batch
            for job in {queued.job for queued in batch}:
                self._fail(job, NotReady("the server is shutting down"))
            raise
        except Exception as exc:  # the model failed: every job in this batch learns why
            logger.exception("engine failed on a batch of %d pairs", len(batch))
            failure = EngineFailure(f"the model failed on this request's batch: {type(exc).__name__}: {exc}")
            for job in {queued.job for queued in batch}:
                self._fail(job, failure)
            return
        self._deliver(batch, engine, outputs, time.monotonic_ns())

    def _forward(self, pairs: list[EncodedPair]) -> tuple[Engine, np.ndarray]:
        """The engine that ran the batch (a compiled one may take over between batches) and its outputs.

        An engine built for fixed batch shapes gets the batch padded to the smallest that holds it; the
        padding rows' outputs are dropped."""
        engine = self.engine
        buckets = engine.shape_buckets
        shape = None if buckets is None else buckets.fit(len(pairs), max(len(pair) for pair in pairs))
        batch: TokenBatch = collate(pairs, self._pad_token_id, self._with_token_type_ids, shape)
        outputs = engine.forward(batch)
        rows, columns = batch.shape
        if outputs.shape[0] != rows:
            raise RuntimeError(f"the engine returned {outputs.shape[0]} rows for a batch of {rows}")
        if self._on_batch is not None:
            self._on_batch(len(pairs), rows * columns)
        return engine, outputs[: len(pairs)]

    def _deliver(self, batch: list[_QueuedPair], engine: Engine, outputs: np.ndarray, done_ns: int) -> None:
        finite = np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1)
        non_finite_rows: dict[ScoringJob, int] = {}
        for queued, row_finite in zip(batch, finite, strict=True):
            if not row_finite and not queued.job.finished:
                non_finite_rows[queued.job] = non_finite_rows.get(queued.job, 0) + 1
        for job, rows in non_finite_rows.items():
            self._fail(job, NonFiniteOutput(rows, len(job.pairs)))
            self._dequeue(job)
            if self._on_non_finite is not None:
                self._on_non_finite(engine, rows)
        touched: set[ScoringJob] = set()
        for queued, row_output in zip(batch, outputs, strict=True):
            job = queued.job
            if job.finished:  # cancelled or failed while its batch ran
                continue
            if job.outputs is None:
                job.outputs = np.empty((len(job.pairs), *row_output.shape), dtype=np.float32)
            job.outputs[queued.row] = row_output
            job.remaining -= 1
            touched.add(job)
        for job in touched:
            job.batches += 1
            job.last_batch_done_ns = done_ns
            if job.remaining == 0:
                job.future.set_result(job.outputs)

    def _next_batch(self, idle_workers: int = 1) -> list[_QueuedPair]:
        """Drop dead work, then pack the batch around the oldest pair.

        Over the queue sorted by length, every window that contains the oldest pair and fits the
        budget is a candidate; the one carrying the most real (unpadded) tokens wins, ties going to
        the least padding. So pairs of similar length travel together, and a short pair rides along
        only where a slot would otherwise be empty. A batch takes at most its share of the queue
        among the ``idle_workers``, so they all get work.
        """
        self._drop_dead_work()
        if not self._queue:
            return []
        limits = self.limits
        share = math.ceil(len(self._queue) / max(1, idle_workers))
        by_length = self._queue
        anchor = self._oldest()
        anchor_position = bisect.bisect_left(by_length, anchor.order, key=_by_order)
        # Every window holding the anchor lies within this many pairs of it.
        reach = max(1, min(share, limits.max_batch_pairs))
        low = max(0, anchor_position - reach + 1)
        high = min(len(by_length), anchor_position + reach)
        prefix = [0, *itertools.accumulate(queued.length for queued in by_length[low:high])]
        best: tuple[int, int] = (-1, 0)  # (real tokens, -padded tokens)
        best_window = (anchor_position, anchor_position)
        for end in range(anchor_position, high):
            longest = by_length[end].length
            fits = max(1, min(reach, limits.max_batch_tokens // longest))
            start = max(0, end - fits + 1)
            if start > anchor_position:
                break  # longer pairs only shrink the window further
            score = (prefix[end + 1 - low] - prefix[start - low], -(end - start + 1) * longest)
            if score > best:
                best, best_window = score, (start, end)
        start, end = best_window
        batch = by_length[start : end + 1]
        del by_length[start : end + 1]
        for queued in batch:
            self._forget(queued)
        self._queued_pairs -= len(batch)
        self._forget_arrivals_if_empty()
        return batch

    def _oldest(self) -> _QueuedPair:
        """The pair queued longest (the queue is not empty)."""
        while not self._arrivals[0].queued:
            self._arrivals.popleft()
        return self._arrivals[0]

    def _forget(self, queued: _QueuedPair) -> None:
        """``queued`` has left the queue (the caller took it out of ``_queue``)."""
        queued.queued = False
        left = self._queued_jobs[queued.job] - 1
        if left:
            self._queued_jobs[queued.job] = left
        else:
            del self._queued_jobs[queued.job]

    def _drop_dead_work(self) -> None:
        now = time.monotonic()
        dead = {job for job in self._queued_jobs if job.finished or job.expired(now)}
        if not dead:
            return
        for job in dead:
            if not job.finished:
                self._fail(job, DeadlineExpired("the deadline passed while the request waited in the queue"))
        self._keep_queued(lambda queued: queued.job not in dead)

    def _withdraw(self, job: ScoringJob) -> None:
        """Its caller left: cancel the job and take its pairs out of the queue now."""
        job.future.cancel()
        self._dequeue(job)

    def _dequeue(self, job: ScoringJob) -> None:
        """Take a finished job's pairs still queued out of the queue, so they stop counting toward the
        limit; its rows already running are dropped when their batch comes back."""
        if job in self._queued_jobs:
            self._keep_queued(lambda queued: queued.job is not job)

    def _keep_queued(self, keep: Callable[[_QueuedPair], bool]) -> None:
        """Only the queued pairs ``keep`` holds stay queued, and counted."""
        alive = []
        for queued in self._queue:
            if keep(queued):
                alive.append(queued)
            else:
                self._forget(queued)
        self._queued_pairs -= len(self._queue) - len(alive)
        self._queue = alive
        self._forget_arrivals_if_empty()

    def _forget_arrivals_if_empty(self) -> None:
        """With nothing queued, the arrival order lets go of the pairs it still held, and their jobs."""
        if not self._queue:
            self._arrivals.clear()

    @staticmethod
    def _fail(job: ScoringJob, error: ServingError) -> None:
        if not job.future.done():
            job.future.set_exception(error)
