"""Request logic for reranking, free of gRPC: validate, tokenize, score through the batcher, rank.

The transport converts protobuf to these types and back; tests can call this layer directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sidecar.errors import InvalidArgument
from sidecar.model.tokenization import PairSpec, PromptPairTokenizer, Truncation
from sidecar.scheduling.batcher import ScoringJob
from sidecar.scheduling.scoring import Scorer


@dataclass(frozen=True, slots=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True, slots=True)
class RerankOptions:
    top_n: int = 0
    raw_scores: bool = False
    max_length: int = 0
    truncation: Truncation = Truncation.RIGHT
    chunk: bool = False
    max_chunks_per_doc: int = 0
    chunk_overlap: int = 0
    return_text: bool = False
    instruction: str = ""


@dataclass(frozen=True, slots=True)
class ScoredDocument:
    index: int
    id: str
    score: float
    text: str | None


@dataclass(slots=True)
class Usage:
    pairs: int = 0
    chunks: int = 0
    tokens: int = 0
    batches: int = 0
    queue_ns: int = 0
    tokenization_ns: int = 0
    inference_ns: int = 0
    total_ns: int = 0

    @classmethod
    def of_job(
        cls, *, pairs: int, chunks: int, tokens: int, tokenization_ns: int, job: ScoringJob, started_ns: int
    ) -> Usage:
        """The usage of one request whose rows ran as ``job``; total time runs from ``started_ns``."""
        return cls(
            pairs=pairs,
            chunks=chunks,
            tokens=tokens,
            batches=job.batches,
            queue_ns=job.queue_ns,
            tokenization_ns=tokenization_ns,
            inference_ns=job.inference_ns,
            total_ns=time.monotonic_ns() - started_ns,
        )

    def add(self, other: Usage) -> None:
        """Accumulate another batch's usage (a stream's totals); total_ns is the caller's to set."""
        self.pairs += other.pairs
        self.chunks += other.chunks
        self.tokens += other.tokens
        self.batches += other.batches
        self.queue_ns += other.queue_ns
        self.tokenization_ns += other.tokenization_ns
        self.inference_ns += other.inference_ns


@dataclass(frozen=True, slots=True)
class Ranking:
    results: list[ScoredDocument]
    usage: Usage


@dataclass(frozen=True, slots=True)
class Limits:
    max_documents_per_request: int
    max_chunks_per_doc: int
    max_request_tokens: int


def check_tokens(tokens: int, limit: int) -> None:
    """Refuse, before it is queued, a request whose tokens exceed the per-request limit."""
    if tokens > limit:
        raise InvalidArgument(
            f"this request tokenizes to {tokens} tokens, over the limit of {limit} per request (or stream "
            "message) (--max-request-tokens); send fewer or shorter documents, or fewer chunks"
        )


def rank(scored: Sequence[ScoredDocument], top_n: int) -> list[ScoredDocument]:
    """Sort by score, descending, ties by index; keep the best top_n (0 keeps all)."""
    ordered = sorted(scored, key=lambda result: (-result.score, result.index))
    return ordered[:top_n] if top_n else ordered


class Reranker:
    def __init__(self, scorer: Scorer, limits: Limits) -> None:
        self.scorer = scorer
        self.model = scorer.model
        self.batcher = scorer.batcher
        self.limits = limits

    def check_query(self, query: str, options: RerankOptions) -> PairSpec:
        """Validate what a request (or a stream's first message) fixes; returns its tokenization spec."""
        if not query.strip():
            raise InvalidArgument("query is empty; send the text to rank the documents against")
        if options.top_n > self.limits.max_documents_per_request:
            raise InvalidArgument(
                f"top_n {options.top_n} is out of range: at most max_documents_per_request "
                f"({self.limits.max_documents_per_request}), or 0 for all"
            )
        model_limit = self.model.max_length
        if options.max_length > model_limit:
            raise InvalidArgument(
                f"max_length {options.max_length} exceeds the model's limit of {model_limit} tokens; "
                "use a smaller value, or 0 for the limit"
            )
        max_length = options.max_length or model_limit
        if max_length < self.model.tokenizer.min_max_length():
            raise InvalidArgument(
                f"max_length {max_length} is too small: at least {self.model.tokenizer.min_max_length()} "
                "tokens are needed for the special tokens, the query and the document"
            )
        if options.instruction and not isinstance(self.model.tokenizer, PromptPairTokenizer):
            raise InvalidArgument(
                f"instruction is set, but the model ({self.model.family}) reads no instruction; only "
                "decoder LLM rerankers do (Info.instruction is empty here)"
            )
        if not options.chunk and (options.max_chunks_per_doc or options.chunk_overlap):
            raise InvalidArgument(
                "max_chunks_per_doc and chunk_overlap apply only with long_documents=LONG_DOCUMENTS_CHUNK"
            )
        if options.max_chunks_per_doc > self.limits.max_chunks_per_doc:
            raise InvalidArgument(
                f"max_chunks_per_doc {options.max_chunks_per_doc} is out of range: at most "
                f"{self.limits.max_chunks_per_doc}, or 0 for that limit"
            )
        return PairSpec(
            max_length=max_length,
            truncation=options.truncation,
            chunk=options.chunk,
            max_chunks_per_doc=options.max_chunks_per_doc or self.limits.max_chunks_per_doc,
            chunk_overlap=options.chunk_overlap,
            instruction=options.instruction,
        )

    def check_documents(self, documents: Sequence[Document], seen_ids: dict[str, int], offset: int) -> None:
        """Validate a batch of documents that starts at global index ``offset``; records their ids."""
        total = offset + len(documents)
        if total > self.limits.max_documents_per_request:
            raise InvalidArgument(
                f"too many documents: {total}, the limit per request (or stream) is "
                f"{self.limits.max_documents_per_request} (--max-documents-per-request)"
            )
        for index, document in enumerate(documents, start=offset):
            if not document.id:
                continue
            first = seen_ids.setdefault(document.id, index)
            if first != index:
                raise InvalidArgument(
                    f"document id {document.id!r} is repeated (documents {first} and {index}); "
                    "ids must be unique"
                )

    async def rerank(
        self, query: str, documents: Sequence[Document], options: RerankOptions, deadline: float | None
    ) -> Ranking:
        started = time.monotonic_ns()
        spec = self.check_query(query, options)
        if not documents:
            raise InvalidArgument("documents is empty; send at least one document to rank")
        self.check_documents(documents, {}, 0)
        scored, usage = await self.score(query, documents, spec, options, deadline, offset=0)
        usage.total_ns = time.monotonic_ns() - started
        return Ranking(rank(scored, options.top_n), usage)

    async def score(
        self,
        query: str,
        documents: Sequence[Document],
        spec: PairSpec,
        options: RerankOptions,
        deadline: float | None,
        offset: int,
    ) -> tuple[list[ScoredDocument], Usage]:
        """Score documents (already validated) in their given order; indices start at ``offset``."""
        started = time.monotonic_ns()
        self.batcher.admit(len(documents))
        encoded = await self.scorer.encode(query, [document.text for document in documents], spec)
        check_tokens(encoded.tokens, self.limits.max_request_tokens)
        chunks = await self.scorer.score(encoded, deadline)
        # Max-pool chunks per document; normalizing is monotonic, so pooling before it is exact.
        pooled = np.full(len(documents), -np.inf, dtype=np.float32)
        np.maximum.at(pooled, np.asarray(encoded.document_of_pair), chunks.raw)
        scores = pooled if options.raw_scores else self.scorer.normalize(pooled)
        results = [
            ScoredDocument(
                index=offset + position,
                id=document.id,
                score=float(score),
                text=document.text if options.return_text else None,
            )
            for position, (document, score) in enumerate(zip(documents, scores, strict=True))
        ]
        usage = Usage.of_job(
            pairs=len(documents),
            chunks=len(encoded.document_of_pair),
            tokens=encoded.tokens,
            tokenization_ns=encoded.tokenization_ns,
            job=chunks.job,
            started_ns=started,
        )
        return results, usage


@dataclass
class StreamSession:
    """The state of one RerankStream call: what the first message fixed, and everything scored since."""

    reranker: Reranker
    query: str
    options: RerankOptions
    spec: PairSpec
    deadline: float | None
    started_ns: int = field(default_factory=time.monotonic_ns)
    seen_ids: dict[str, int] = field(default_factory=dict)
    documents_received: int = 0
    scored: list[ScoredDocument] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)

    @classmethod
    def open(
        cls, reranker: Reranker, query: str, options: RerankOptions, deadline: float | None
    ) -> StreamSession:
        return cls(reranker, query, options, reranker.check_query(query, options), deadline)

    def accept(self, documents: Sequence[Document]) -> int:
        """Validate a batch in arrival order and reserve its global indices; returns its first index."""
        offset = self.documents_received
        self.reranker.check_documents(documents, self.seen_ids, offset)
        self.documents_received += len(documents)
        return offset

    async def score_batch(self, documents: Sequence[Document], offset: int) -> list[ScoredDocument]:
        results, usage = await self.reranker.score(
            self.query, documents, self.spec, self.options, self.deadline, offset
        )
        self.scored.extend(results)
        self.usage.add(usage)
        return results

    def final(self) -> Ranking:
        if not self.scored:
            raise InvalidArgument("the stream carried no documents; send at least one document to rank")
        self.usage.total_ns = time.monotonic_ns() - self.started_ns
        return Ranking(rank(self.scored, self.options.top_n), self.usage)
