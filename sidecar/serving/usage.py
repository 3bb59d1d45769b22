"""What a call used: pairs, chunks, tokens and batches, and where its time went.

``pairs`` counts every document answered; ``cached_pairs`` those of them the score cache answered. The
chunks, tokens, batches and times are those of the documents the model computed."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sidecar.scheduling.batcher import ScoredRows


@dataclass(slots=True)
class Usage:
    pairs: int = 0
    cached_pairs: int = 0
    chunks: int = 0
    tokens: int = 0
    batches: int = 0
    queue_ns: int = 0
    tokenization_ns: int = 0
    inference_ns: int = 0
    total_ns: int = 0

    @classmethod
    def of_rows(
        cls, *, pairs: int, chunks: int, tokens: int, tokenization_ns: int, rows: ScoredRows, started_ns: int
    ) -> Usage:
        """The usage of one request whose rows ran as ``rows``; total time runs from ``started_ns``."""
        return cls(
            pairs=pairs,
            chunks=chunks,
            tokens=tokens,
            batches=rows.batches,
            queue_ns=rows.queue_ns,
            tokenization_ns=tokenization_ns,
            inference_ns=rows.inference_ns,
            total_ns=time.monotonic_ns() - started_ns,
        )

    def add(self, other: Usage) -> None:
        """Accumulate another batch's usage (a stream's totals); total_ns is the caller's to set."""
        self.pairs += other.pairs
        self.cached_pairs += other.cached_pairs
        self.chunks += other.chunks
        self.tokens += other.tokens
        self.batches += other.batches
        self.queue_ns += other.queue_ns
        self.tokenization_ns += other.tokenization_ns
        self.inference_ns += other.inference_ns
