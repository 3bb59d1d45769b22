"""Request logic for embeddings, free of any transport: validate, tokenize, run through the batcher."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sidecar.errors import InvalidArgument
from sidecar.model.kinds import unit_vectors
from sidecar.model.loading import BiEncoderModel
from sidecar.model.tokenization import PairSpec, RowEncoder, Truncation
from sidecar.scheduling.batcher import Batcher
from sidecar.scheduling.tokenizer_pool import TokenizerPool
from sidecar.serving.reranking import check_tokens
from sidecar.serving.usage import Usage


@dataclass(frozen=True, slots=True)
class Embeddings:
    vectors: np.ndarray  # float32 [texts, dims]
    usage: Usage


class Embedder:
    def __init__(
        self,
        model: BiEncoderModel,
        batcher: Batcher,
        tokenizer_pool: TokenizerPool,
        *,
        max_texts: int,
        max_request_tokens: int,
        name: str,
        label: str = "",
    ) -> None:
        self.name = name  # what requests choose it by
        # What metrics and logs call its model: the first name the model is served under.
        self.label = label or name
        self.model = model
        self.batcher = batcher
        self.max_texts = max_texts
        self.max_request_tokens = max_request_tokens
        self._tokenizer_pool = tokenizer_pool

    def _spec(
        self, texts: Sequence[str], max_length: int, truncation: Truncation, truncate: bool
    ) -> PairSpec:
        if not texts:
            raise InvalidArgument("texts is empty; send at least one text to embed")
        if len(texts) > self.max_texts:
            raise InvalidArgument(
                f"too many texts: {len(texts)}, the limit per request is {self.max_texts} "
                "(--max-documents-per-request)"
            )
        if max_length > self.model.max_length:
            raise InvalidArgument(
                f"max_length {max_length} exceeds the embedding model's limit of {self.model.max_length} "
                "tokens; use a smaller value, or 0 for the limit"
            )
        if max_length and max_length < 2:
            raise InvalidArgument(f"max_length {max_length} is too small: at least 2 tokens are needed")
        return PairSpec(
            max_length=max_length or self.model.max_length, truncation=truncation, truncate=truncate
        )

    async def embed(
        self,
        texts: Sequence[str],
        max_length: int,
        truncation: Truncation,
        deadline: float | None,
        *,
        normalize: bool = False,
        truncate: bool = True,
    ) -> Embeddings:
        """The model's vectors, in order; ``normalize`` scales each to unit length (the model's own
        pooling may already have); ``truncate`` False refuses a text past max_length."""
        spec = self._spec(texts, max_length, truncation, truncate)
        started = time.monotonic_ns()
        self.batcher.admit(len(texts))
        encoded = await self._tokenizer_pool.encode(RowEncoder(self.model.tokenizer, spec), texts)
        tokenized = time.monotonic_ns()
        check_tokens(encoded.tokens, self.max_request_tokens)
        rows = await self.batcher.score(encoded.pairs, deadline)
        usage = Usage.of_rows(
            pairs=len(texts),
            chunks=len(encoded.pairs),
            tokens=encoded.tokens,
            tokenization_ns=tokenized - started,
            rows=rows,
            started_ns=started,
        )
        vectors = rows.outputs.astype(np.float32, copy=False)
        if normalize:
            vectors = unit_vectors(vectors)
        return Embeddings(vectors, usage)
