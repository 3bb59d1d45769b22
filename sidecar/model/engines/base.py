"""The one small interface every engine implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import numpy as np

from sidecar.errors import ModelLoadError
from sidecar.model.batch import ShapeBuckets, TokenBatch


def require_precision(engine: str, precision: str, device: str, offered: tuple[str, ...]) -> None:
    """Refuse a precision the engine does not offer on the device, naming the ones it does."""
    if precision not in offered:
        raise ModelLoadError(
            f"the {engine} engine does not run {precision} on {device}; it offers "
            f"{', '.join(offered) or 'nothing'} there"
        )


class Engine(ABC):
    """Runs forward passes for one model, called from the scheduler's model threads: from several at
    once when the batcher has several workers, unless ``concurrent_forward`` is False.

    A cross-encoder engine returns float32 logits of shape [pairs, num_labels]; a bi-encoder
    engine will return pooled embeddings of shape [texts, dims] through the same method.
    """

    name: ClassVar[str]
    # Whether forward runs a graph compiled for this machine (an engine file, an optimized session,
    # TorchInductor), as Info reports it.
    compiled: bool = False
    # Why a row's output may depend on what shares its batch (its companions, its padding); empty where
    # it does not (tests/model/test_batch_invariance.py). Only such engines use the score cache.
    batch_variance: str = ""
    # Whether forward may run from several threads at once (the batcher's workers).
    concurrent_forward: ClassVar[bool] = True
    # Whether one forward runs on one batch worker's share of the threads (a session's own pool, a
    # stream), so only the workers' forwards side by side use every thread; torch's forward runs on the
    # process's threads instead.
    forward_on_worker_share: ClassVar[bool] = False
    # The batch shapes the engine was built for, when it was: the batcher pads each batch to one.
    shape_buckets: ShapeBuckets | None = None
    # A token budget below the device's default that the engine serves as fast with, used unless
    # --max-batch-tokens is set: smaller batches then hold less memory at no cost. None: the default.
    preferred_batch_tokens: ClassVar[int | None] = None
    # How this build departs from the engine's usual one and why (a recipe the parity gate refused),
    # for Info's engine notes; empty when it does not.
    note: str = ""

    def __init__(self, *, precision: str, device: str) -> None:
        self.precision = precision
        self.device = device

    @abstractmethod
    def forward(self, batch: TokenBatch) -> np.ndarray:
        """Outputs for every row of the batch, as float32, in row order."""

    def close(self) -> None:  # noqa: B027 - optional hook, most engines hold nothing to release
        """Release what the engine holds (device memory, sessions)."""

    def release_scratch(self) -> None:  # noqa: B027 - optional hook, most engines keep no scratch
        """Give back the memory the engine keeps between batches for its intermediate results (sized
        for the largest batch it ran); the next batch allocates what it needs again. Called only while
        no forward runs."""


def forward_side_by_side(calls: Sequence[tuple[Engine, TokenBatch]], side_by_side: int) -> list[np.ndarray]:
    """Each call's outputs, ``side_by_side`` forwards running at once, as the batcher's workers run them.

    Before that, one row of the first call into each engine library runs alone: a library's first call
    through its Python bindings initializes statics (pybind11's numpy API, in OpenVINO's) that two
    threads entering at once deadlocked on, hanging a warm start."""
    if side_by_side <= 1 or len(calls) <= 1:
        return [engine.forward(batch) for engine, batch in calls]
    first_of_library: dict[str, tuple[Engine, TokenBatch]] = {}
    for engine, batch in calls:
        first_of_library.setdefault(engine.name, (engine, batch))
    for engine, batch in first_of_library.values():
        engine.forward(batch.rows(0, 1))
    with ThreadPoolExecutor(side_by_side, thread_name_prefix="side-by-side") as pool:
        return list(pool.map(lambda call: call[0].forward(call[1]), calls))
