"""How a model turns a query and documents into one raw score per chunk.

A cross-encoder reads each (query, chunk) pair and gives its log-odds; a bi-encoder embeds the
query and each chunk apart and gives their cosine (``model.kinds``). Both go through the same batcher.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sidecar.model.batch import EncodedPair
from sidecar.model.kinds import kind_of
from sidecar.model.loading import TextModel
from sidecar.model.tokenization import PairSpec
from sidecar.scheduling.batcher import Batcher, ScoredRows
from sidecar.scheduling.tokenizer_pool import TokenizerPool
from sidecar.serving.score_cache import ScoreCache


@dataclass(frozen=True, slots=True)
class EncodedRequest:
    """Model inputs for one request: the pairs (cross-encoder) or texts (bi-encoder) to run."""

    rows: list[EncodedPair]
    document_of_pair: list[int]  # per chunk, not counting a bi-encoder's leading query row
    tokenization_ns: int

    @property
    def tokens(self) -> int:
        return sum(len(row) for row in self.rows)


@dataclass(frozen=True, slots=True)
class ChunkScores:
    raw: np.ndarray  # float32, one per chunk
    rows: ScoredRows


class Scorer:
    """Scores a query against documents with one model, through its batcher and the tokenizer pool;
    what the model's kind makes of texts and outputs comes from the kind table. ``score_cache`` keeps its
    documents' pooled raw scores for repeated pairs (see ``Reranker.score``)."""

    def __init__(
        self, model: TextModel, batcher: Batcher, tokenizer_pool: TokenizerPool, score_cache: ScoreCache
    ) -> None:
        self.model = model
        self.batcher = batcher
        self.score_cache = score_cache
        self._kind = kind_of(model)
        self._tokenizer_pool = tokenizer_pool

    async def encode(self, query: str, documents: Sequence[str], spec: PairSpec) -> EncodedRequest:
        """The query's own rows first (a bi-encoder's), then one row per document chunk."""
        started = time.monotonic_ns()
        encode_documents = self._kind.document_encoder(self.model, query, spec)
        encode_query = self._kind.query_encoder(self.model, spec)
        if encode_query is None:
            encoded = await self._tokenizer_pool.encode(encode_documents, documents)
            rows = encoded.pairs
        else:
            encoded_query, encoded = await asyncio.gather(
                self._tokenizer_pool.encode(encode_query, [query]),
                self._tokenizer_pool.encode(encode_documents, documents),
            )
            rows = [*encoded_query.pairs, *encoded.pairs]
        return EncodedRequest(rows, encoded.document_of_pair, time.monotonic_ns() - started)

    async def score(self, encoded: EncodedRequest, deadline: float | None) -> ChunkScores:
        rows = await self.batcher.score(encoded.rows, deadline)
        return ChunkScores(self._kind.raw_scores(self.model, rows.outputs), rows)

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        """Raw scores mapped into [0, 1]: a cross-encoder's sigmoid, a bi-encoder's rescaled cosine."""
        return self._kind.normalize(raw)
