"""Workers that tokenize requests off the event loop, splitting a large request across them: threads of
the serving process, or tokenizer processes that hand back ready token arrays."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import sidecar
from sidecar.errors import TokenizationFailure
from sidecar.model.hardware import usable_cpus
from sidecar.model.tokenization import EncodedDocuments, PairSpec, PairTokenizer, RowEncoder
from sidecar.scheduling import tokenizer_worker

logger = logging.getLogger(__name__)

# Below this many documents a slice costs more in hand-offs than it saves.
_MIN_DOCUMENTS_PER_SLICE = 16
# Past this many workers, slicing a request further saves less than the hand-offs cost.
_MOST_DEFAULT_WORKERS = 8
TOKENIZE_IN = ("auto", "threads", "processes")
# What a tokenizer process that died leaves its pipes raising.
_DIED = (asyncio.IncompleteReadError, BrokenPipeError, ConnectionResetError)


def tokenizer_workers(configured: int) -> int:
    """``--tokenizer-workers``, or when it is 0 one per core this process may use, at most 8: a GPU
    host's cores tokenize while the GPU scores, and a 2-core pod keeps 2."""
    if configured:
        return configured
    return min(_MOST_DEFAULT_WORKERS, usable_cpus())


def tokenizes_in_processes(tokenize_in: str, device: str) -> bool:
    """``--tokenize-in`` for a model served on ``device``: auto uses processes on a GPU, whose pace leaves
    the serving process's GIL the limit (benchmarks/RESULTS.md, "NVIDIA H200"), and threads on a CPU,
    whose cores the engine needs and where each process would only add its memory."""
    if tokenize_in == "auto":
        return device != "cpu"
    return tokenize_in == "processes"


class TokenizerPool:
    """``workers`` threads, or with ``processes`` as many tokenizer processes.

    Threads: the Rust tokenizer releases the GIL while it encodes, but building each row's Python lists
    holds it. Processes (``tokenizer_worker``): each holds its own interpreter's GIL for that, and hands
    the rows back as flat arrays (``PackedRows``), so the serving process only pickles the texts and
    unpickles three buffers a slice. A process that dies is replaced, and its slice retried once.

    Either replaces the tokenizer's own thread pool, which the server turns off: that pool took every
    core for each request, while this one is bounded by ``--tokenizer-workers``.
    """

    def __init__(self, workers: int, *, processes: bool = False) -> None:
        self.workers = workers
        self._processes = processes
        self._threads: ThreadPoolExecutor | None = None
        self._idle: asyncio.Queue[_TokenizerProcess] | None = None
        self._every_process: set[_TokenizerProcess] = set()
        self._starting: asyncio.Task[None] | None = None
        self._replacing: set[asyncio.Future[None]] = set()
        self._closed = False
        self._slices_running = 0  # touched on the event loop only

    @property
    def processes(self) -> bool:
        return self._processes

    def use_processes(self, processes: bool) -> None:
        """Choose threads or processes, before the pool starts (a model's device decides ``auto``)."""
        if self.started and processes != self._processes:
            raise RuntimeError("the tokenizer pool has started; it cannot change from threads to processes")
        self._processes = processes

    @property
    def started(self) -> bool:
        return self._threads is not None or self._starting is not None

    async def start(self) -> None:
        """Start every worker now, so no request waits for one (a process takes a fraction of a second)."""
        if not self._processes:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="tokenize")
            return
        if self._starting is None:
            self._starting = asyncio.create_task(self._start_processes())
        await self._starting

    async def _start_processes(self) -> None:
        self._idle = asyncio.Queue()
        for process in await asyncio.gather(*(_TokenizerProcess.start() for _ in range(self.workers))):
            self._every_process.add(process)
            self._idle.put_nowait(process)

    async def share(self, tokenizer: PairTokenizer) -> None:
        """Send a model's tokenizer to every process now, at start-up, rather than with each process's
        first slice of that model's rows (a large vocabulary takes a while to pickle)."""
        if not self._processes:
            return
        await self.start()
        assert self._idle is not None
        processes = [await self._idle.get() for _ in range(len(self._every_process))]
        try:
            await asyncio.gather(*(process.learn(tokenizer) for process in processes))
        finally:
            for process in processes:
                self._idle.put_nowait(process)

    async def encode(self, encoder: RowEncoder, documents: Sequence[str]) -> EncodedDocuments:
        """``encoder(documents)``, run as slices in parallel on the idle workers (at least one slice) and
        merged in order. Under load no worker is idle and a request is one slice: splitting it then
        shortens nothing and costs each slice's hand-offs, which hold the GIL."""
        await self.start()
        idle = max(1, self.workers - self._slices_running)
        slices = min(idle, max(1, len(documents) // _MIN_DOCUMENTS_PER_SLICE))
        bounds = [len(documents) * index // slices for index in range(slices + 1)]
        run = self._in_process if self._processes else self._in_thread
        self._slices_running += slices
        try:
            parts = await asyncio.gather(
                *(run(encoder, documents[start:end]) for start, end in itertools.pairwise(bounds))
            )
        finally:
            self._slices_running -= slices
        if len(parts) == 1:
            return parts[0]
        merged = EncodedDocuments([], [])
        for start, part in zip(bounds, parts, strict=False):
            merged.pairs.extend(part.pairs)
            merged.document_of_pair.extend(start + document for document in part.document_of_pair)
        return merged

    async def close(self) -> None:
        self._closed = True
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
        if self._starting is not None:
            await asyncio.gather(self._starting, *self._replacing, return_exceptions=True)
        await asyncio.gather(*(process.stop() for process in self._every_process))
        self._every_process.clear()

    async def _in_thread(self, encoder: RowEncoder, texts: Sequence[str]) -> EncodedDocuments:
        return await asyncio.get_running_loop().run_in_executor(self._threads, encoder, texts)

    async def _in_process(self, encoder: RowEncoder, texts: Sequence[str]) -> EncodedDocuments:
        try:
            return await self._in_worker(encoder, texts)
        except _DIED:
            pass  # a fresh process replaces it: one retry
        try:
            return await self._in_worker(encoder, texts)
        except _DIED:
            raise TokenizationFailure(
                "a tokenizer process died on this request twice; the server log has the details"
            ) from None

    async def _in_worker(self, encoder: RowEncoder, texts: Sequence[str]) -> EncodedDocuments:
        assert self._idle is not None
        if not self._every_process and not self._replacing:
            raise TokenizationFailure("no tokenizer process is running, and none could be started")
        process = await self._idle.get()
        while process.returncode is not None:  # it died while idle
            self._lost(process)
            process = await self._idle.get()
        # Shielded: a caller that leaves must not cut the exchange short, which would leave the
        # process's answer unread in its pipe; the process goes back to the pool once it answers.
        exchange = asyncio.ensure_future(process.encode(encoder, list(texts)))
        exchange.add_done_callback(lambda done: self._finished(process, done))
        return await asyncio.shield(exchange)

    def _finished(self, process: _TokenizerProcess, exchange: asyncio.Future[EncodedDocuments]) -> None:
        assert self._idle is not None
        error = None if exchange.cancelled() else exchange.exception()
        if isinstance(error, _DIED):
            self._lost(process)
        else:
            self._idle.put_nowait(process)

    def _lost(self, process: _TokenizerProcess) -> None:
        """A process died: a new one takes its place."""
        self._every_process.discard(process)
        if self._closed:
            return
        logger.error("a tokenizer process died (exit code %s); starting a new one", process.returncode)
        replacing = asyncio.ensure_future(self._replace())
        self._replacing.add(replacing)  # held until done: the loop keeps only weak references to tasks
        replacing.add_done_callback(self._replacing.discard)

    async def _replace(self) -> None:
        assert self._idle is not None
        try:
            process = await _TokenizerProcess.start()
        except Exception:
            logger.exception("a tokenizer process could not be started; the pool has one fewer")
            return
        self._every_process.add(process)
        self._idle.put_nowait(process)


# The directory that holds the sidecar package, so a process started anywhere imports this copy.
_SOURCE_ROOT = Path(sidecar.__file__).resolve().parent.parent


class _TokenizerProcess:
    """One ``tokenizer_worker`` process, and which tokenizers it has been sent."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self._tokenizers: set[int] = set()
        # Held, so no key (an id) is reused while this process keeps the tokenizer under it.
        self._sent: list[PairTokenizer] = []

    @classmethod
    async def start(cls) -> _TokenizerProcess:
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(_SOURCE_ROOT), path)))}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            tokenizer_worker.__name__,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        started = cls(process)
        try:
            await started._answer()  # it says it is ready once its imports are done
        except _DIED:
            await process.wait()
            raise TokenizationFailure(
                f"a tokenizer process exited before it was ready (exit code {process.returncode}); "
                "its error is in the log above"
            ) from None
        return started

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def encode(self, encoder: RowEncoder, texts: list[str]) -> EncodedDocuments:
        stdin = self._process.stdin
        assert stdin is not None
        key = id(encoder.tokenizer)
        first = key not in self._tokenizers
        if not first and not texts:
            return EncodedDocuments([], [])
        stdin.write(
            tokenizer_worker.frame(
                (key, encoder.tokenizer if first else None, encoder.spec, encoder.query, texts)
            )
        )
        await stdin.drain()
        if first:
            self._tokenizers.add(key)
            self._sent.append(encoder.tokenizer)
        answer = await self._answer()
        if isinstance(answer, Exception):
            raise answer
        packed, document_of_pair = answer
        return EncodedDocuments(packed.pairs(), document_of_pair)

    async def learn(self, tokenizer: PairTokenizer) -> None:
        """Send ``tokenizer`` with an empty slice, unless it was sent before."""
        await self.encode(RowEncoder(tokenizer, PairSpec(max_length=tokenizer.min_max_length())), [])

    async def _answer(self) -> Any:
        stdout = self._process.stdout
        assert stdout is not None
        (length,) = tokenizer_worker.LENGTH.unpack(await stdout.readexactly(tokenizer_worker.LENGTH.size))
        return pickle.loads(await stdout.readexactly(length))

    async def stop(self) -> None:
        """Close its input, on which it exits; killed if it has not within a few seconds."""
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            async with asyncio.timeout(5):
                await self._process.wait()
        except TimeoutError:
            self._process.kill()
            await self._process.wait()
