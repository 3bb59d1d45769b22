"""Threads that tokenize requests off the event loop, splitting a large request across them."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from sidecar.model.tokenization import EncodedDocuments

# Below this many documents a slice costs more in thread hand-offs than it saves.
_MIN_DOCUMENTS_PER_SLICE = 16
# Past this many threads, slicing a request further saves less than the hand-offs cost.
_MOST_DEFAULT_WORKERS = 8


def tokenizer_workers(configured: int) -> int:
    """``--tokenizer-workers``, or when it is 0 one per core this process may run on, at most 8: a GPU
    host's cores tokenize while the GPU scores, and a 2-core pod keeps 2."""
    if configured:
        return configured
    return max(1, min(_MOST_DEFAULT_WORKERS, len(os.sched_getaffinity(0))))


class TokenizerPool:
    """``workers`` threads; the Rust tokenizer releases the GIL, so slices of one request tokenize in
    parallel. This replaces the tokenizer's own thread pool, which the server turns off: that pool
    took every core for each request, while this one is bounded by ``--tokenizer-workers``.
    """

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="tokenize")
        self._slices_running = 0  # touched on the event loop only

    async def encode(
        self, encode: Callable[[Sequence[str]], EncodedDocuments], documents: Sequence[str]
    ) -> EncodedDocuments:
        """``encode(documents)``, run as slices in parallel on the idle workers (at least one slice) and
        merged in order. Under load no worker is idle and a request is one slice: splitting it then
        shortens nothing and costs each slice's hand-offs, which hold the GIL."""
        idle = max(1, self._workers - self._slices_running)
        slices = min(idle, max(1, len(documents) // _MIN_DOCUMENTS_PER_SLICE))
        bounds = [len(documents) * index // slices for index in range(slices + 1)]
        loop = asyncio.get_running_loop()
        self._slices_running += slices
        try:
            parts = await asyncio.gather(
                *(
                    loop.run_in_executor(self._executor, encode, documents[start:end])
                    for start, end in itertools.pairwise(bounds)
                )
            )
        finally:
            self._slices_running -= slices
        merged = EncodedDocuments([], [])
        for start, part in zip(bounds, parts, strict=False):
            merged.pairs.extend(part.pairs)
            merged.document_of_pair.extend(start + document for document in part.document_of_pair)
        return merged

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
