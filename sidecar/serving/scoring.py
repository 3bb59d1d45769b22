"""How a model turns a query and documents into one raw score per chunk.

A cross-encoder reads each (query, chunk) pair and gives its log-odds; a bi-encoder embeds the
query and each chunk apart and gives their cosine. Both go through the same batcher.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from sidecar.model.batch import EncodedPair
from sidecar.model.loading import BiEncoderModel, CrossEncoderModel, ModelKind, TextModel
from sidecar.model.tokenization import PairSpec
from sidecar.scheduling.batcher import Batcher, ScoredRows
from sidecar.scheduling.tokenizer_pool import TokenizerPool


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


class CrossEncoderScorer:
    def __init__(self, model: CrossEncoderModel, batcher: Batcher, tokenizer_pool: TokenizerPool) -> None:
        self.model = model
        self.batcher = batcher
        self._tokenizer_pool = tokenizer_pool

    async def encode(self, query: str, documents: Sequence[str], spec: PairSpec) -> EncodedRequest:
        started = time.monotonic_ns()
        encode_pairs = partial(self.model.tokenizer.encode, query, spec=spec)
        encoded = await self._tokenizer_pool.encode(encode_pairs, documents)
        return EncodedRequest(encoded.pairs, encoded.document_of_pair, time.monotonic_ns() - started)

    async def score(self, encoded: EncodedRequest, deadline: float | None) -> ChunkScores:
        rows = await self.batcher.score(encoded.rows, deadline)
        logits = rows.outputs.astype(np.float32, copy=False)
        # One log-odds per pair: the logit, or positive minus negative for two-label models.
        raw = logits[:, 0] if self.model.num_labels == 1 else logits[:, 1] - logits[:, 0]
        return ChunkScores(raw, rows)

    @staticmethod
    def normalize(raw: np.ndarray) -> np.ndarray:
        """Sigmoid: the probability of relevance, in fp64 so large logits do not overflow."""
        return 1.0 / (1.0 + np.exp(-raw.astype(np.float64)))


class BiEncoderScorer:
    def __init__(self, model: BiEncoderModel, batcher: Batcher, tokenizer_pool: TokenizerPool) -> None:
        self.model = model
        self.batcher = batcher
        self._tokenizer_pool = tokenizer_pool

    async def encode(self, query: str, documents: Sequence[str], spec: PairSpec) -> EncodedRequest:
        """The query's row first, then one row per document chunk."""
        started = time.monotonic_ns()
        encode_texts = self.model.tokenizer.encode_texts
        query_spec = PairSpec(max_length=spec.max_length)  # the query is never chunked: one row
        encoded_query, encoded = await asyncio.gather(
            self._tokenizer_pool.encode(partial(encode_texts, spec=query_spec), [query]),
            self._tokenizer_pool.encode(partial(encode_texts, spec=spec), documents),
        )
        rows = [*encoded_query.pairs, *encoded.pairs]
        return EncodedRequest(rows, encoded.document_of_pair, time.monotonic_ns() - started)

    async def score(self, encoded: EncodedRequest, deadline: float | None) -> ChunkScores:
        rows = await self.batcher.score(encoded.rows, deadline)
        vectors = unit_vectors(rows.outputs)
        return ChunkScores((vectors[1:] @ vectors[0]).astype(np.float32), rows)

    @staticmethod
    def normalize(raw: np.ndarray) -> np.ndarray:
        """Cosine similarity mapped from [-1, 1] to [0, 1]."""
        return (raw.astype(np.float64) + 1.0) / 2.0


def unit_vectors(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)


Scorer = CrossEncoderScorer | BiEncoderScorer
# How each declared model kind scores a query against documents.
SCORER_OF_KIND: dict[ModelKind, type[Scorer]] = {
    ModelKind.CROSS_ENCODER: CrossEncoderScorer,
    ModelKind.BI_ENCODER: BiEncoderScorer,
}


def scorer_for(model: TextModel, batcher: Batcher, tokenizer_pool: TokenizerPool) -> Scorer:
    return SCORER_OF_KIND[model.kind](model, batcher, tokenizer_pool)  # type: ignore[arg-type]
