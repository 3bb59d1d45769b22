"""Pair tokenization with explicit truncation and chunking, safe to call from several threads.

We own a private copy of the model's Rust tokenizer with truncation and padding switched off, and
only ever call ``encode``/``post_process`` on it. Mutating a shared fast tokenizer per call (as
``tokenizer(..., truncation=...)`` does) races between threads and fails with "Already borrowed".
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Encoding, Tokenizer

from sidecar.errors import InvalidArgument
from sidecar.model.batch import EncodedPair


class Truncation(enum.Enum):
    RIGHT = "right"  # keep the start of the document
    LEFT = "left"  # keep the end of the document


@dataclass(frozen=True, slots=True)
class PairSpec:
    """How to turn one query and its documents into model inputs."""

    max_length: int
    truncation: Truncation = Truncation.RIGHT
    chunk: bool = False
    max_chunks_per_doc: int = 1
    chunk_overlap: int = 0


@dataclass(frozen=True, slots=True)
class EncodedQuery:
    """All pairs of one request, and which document each pair (chunk) belongs to."""

    pairs: list[EncodedPair]
    document_of_pair: list[int]

    @property
    def tokens(self) -> int:
        return sum(len(pair) for pair in self.pairs)


class PairTokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.special_tokens_per_pair = self._tokenizer.num_special_tokens_to_add(is_pair=True)

    def min_max_length(self) -> int:
        """The smallest max_length that leaves room for one query token and one document token."""
        return self.special_tokens_per_pair + 2

    def encode(self, query: str, documents: Sequence[str], spec: PairSpec) -> EncodedQuery:
        """(query, document) pairs for a cross-encoder; a long document is truncated or chunked."""
        query_encoding = self._tokenizer.encode(query, add_special_tokens=False)
        # A long query keeps at most half the budget, so documents always get the other half.
        query_budget = spec.max_length // 2
        if len(query_encoding.ids) > query_budget:
            query_encoding.truncate(query_budget, direction="right")
        document_budget = spec.max_length - self.special_tokens_per_pair - len(query_encoding.ids)
        return self._encode_documents(documents, document_budget, spec, query_encoding)

    def encode_texts(self, texts: Sequence[str], spec: PairSpec) -> EncodedQuery:
        """Single texts for a bi-encoder, each truncated or chunked to ``spec.max_length``."""
        budget = spec.max_length - self._tokenizer.num_special_tokens_to_add(is_pair=False)
        return self._encode_documents(texts, budget, spec, query=None)

    def _encode_documents(
        self, documents: Sequence[str], budget: int, spec: PairSpec, query: Encoding | None
    ) -> EncodedQuery:
        if spec.chunk and spec.chunk_overlap >= budget:
            raise InvalidArgument(
                f"chunk_overlap {spec.chunk_overlap} must be smaller than the chunk length: "
                f"{budget} document tokens fit in max_length {spec.max_length}"
            )
        pairs: list[EncodedPair] = []
        document_of_pair: list[int] = []
        for index, document in enumerate(self._tokenizer.encode_batch(documents, add_special_tokens=False)):
            for piece in self._pieces(document, budget, spec):
                if query is None:
                    merged = self._tokenizer.post_process(piece, add_special_tokens=True)
                else:
                    merged = self._tokenizer.post_process(query, piece, add_special_tokens=True)
                pairs.append(EncodedPair(merged.ids, merged.type_ids))
                document_of_pair.append(index)
        return EncodedQuery(pairs, document_of_pair)

    @staticmethod
    def _pieces(document: Encoding, budget: int, spec: PairSpec) -> list[Encoding]:
        if not spec.chunk:
            document.truncate(budget, direction=spec.truncation.value)
            return [document]
        document.truncate(budget, stride=spec.chunk_overlap, direction="right")
        return [document, *document.overflowing][: spec.max_chunks_per_doc]
