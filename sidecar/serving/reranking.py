"""Request logic for reranking, free of any transport: validate, tokenize, score through the batcher, rank.

A transport converts its messages to these types and back; tests can call this layer directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from sidecar.errors import InvalidArgument
from sidecar.model.tokenization import PairSpec, Truncation
from sidecar.serving.scoring import Scorer
from sidecar.serving.usage import Usage


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
    # False: a document past max_length is refused rather than truncated.
    truncate: bool = True


@dataclass(frozen=True, slots=True)
class ScoredDocument:
    index: int
    id: str
    score: float
    text: str | None


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
    def __init__(self, scorer: Scorer, limits: Limits, *, name: str, label: str = "") -> None:
        self.name = name  # what requests choose it by
        # What metrics and logs call its model: the first name the model is served under.
        self.label = label or name
        self.scorer = scorer
        self.model = scorer.model
        self.batcher = scorer.batcher
        self.limits = limits

    def check_query(self, query: str, options: RerankOptions) -> PairSpec:
        """Validate what a request (or a stream's first message) fixes; returns its tokenization spec."""
        if not query.strip():
            raise InvalidArgument(
                "query is empty; send the text to rank the documents against", field="query"
            )
        if not self.model.tokenizer.has_tokens(query):
            raise InvalidArgument(
                "query has no tokens for this model's tokenizer (it holds only characters the tokenizer "
                "drops, such as zero-width or control characters); send the text to rank the documents "
                "against",
                field="query",
            )
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
        if options.instruction and not self.model.tokenizer.instruction:
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
            truncate=options.truncate,
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
        """Score documents (already validated) in their given order; indices start at ``offset``.

        Documents the score cache holds are answered from it and never queue; only the rest are
        admitted, tokenized and run, and a request answered entirely from the cache never reaches the
        batcher. Usage counts every document in ``pairs`` and the cached ones in ``cached_pairs``; its
        chunks, tokens, batches and times are those of the documents computed.
        """
        started = time.monotonic_ns()
        texts = [document.text for document in documents]
        cache = self.scorer.score_cache
        # The engine serving now: the cache answers with its scores only, and keeps only its scores.
        engine = self.batcher.engine
        keys = cache.keys(self.model, engine, query, spec, texts) if cache.use_engine(engine) else []
        cached = cache.get(keys) if keys else [None] * len(texts)
        missing = [position for position, score in enumerate(cached) if score is None]
        # Raw scores pooled per document. Normalizing is elementwise and monotonic, so pooling before it,
        # and answering from cached raw scores, both give bit for bit what computing them all would.
        pooled = np.array([-np.inf if score is None else score for score in cached], dtype=np.float32)
        usage = Usage()
        if missing:
            computed, usage = await self._compute(
                query, [texts[position] for position in missing], spec, deadline
            )
            pooled[missing] = computed
            # A compiled engine that took over meanwhile (Batcher.replace_engine) may have run some of
            # the rows: then they are kept under neither engine.
            if keys and self.batcher.engine is engine:
                cache.put([keys[position] for position in missing], computed.tolist())
        usage.pairs, usage.cached_pairs = len(documents), len(documents) - len(missing)
        # In float32, as gRPC carries them: the ranking's ties are the ties a caller sees.
        scores = (pooled if options.raw_scores else self.scorer.normalize(pooled)).astype(np.float32)
        results = [
            ScoredDocument(
                index=offset + position,
                id=document.id,
                score=float(score),
                text=document.text if options.return_text else None,
            )
            for position, (document, score) in enumerate(zip(documents, scores, strict=True))
        ]
        usage.total_ns = time.monotonic_ns() - started
        return results, usage

    async def _compute(
        self, query: str, texts: Sequence[str], spec: PairSpec, deadline: float | None
    ) -> tuple[np.ndarray, Usage]:
        """The texts' raw scores, max-pooled over their chunks, through the batcher, and their usage."""
        started = time.monotonic_ns()
        self.batcher.admit(len(texts))
        encoded = await self.scorer.encode(query, texts, spec)
        check_tokens(encoded.tokens, self.limits.max_request_tokens)
        chunks = await self.scorer.score(encoded, deadline)
        pooled = np.full(len(texts), -np.inf, dtype=np.float32)
        np.maximum.at(pooled, np.asarray(encoded.document_of_pair), chunks.raw)
        usage = Usage.of_rows(
            pairs=len(texts),
            chunks=len(encoded.document_of_pair),
            tokens=encoded.tokens,
            tokenization_ns=encoded.tokenization_ns,
            rows=chunks.rows,
            started_ns=started,
        )
        return pooled, usage


@dataclass(frozen=True, slots=True)
class StreamMessage:
    """One message of a rerank stream, as its transport decoded it."""

    documents: Sequence[Document]
    query: str = ""
    options: RerankOptions = field(default_factory=RerankOptions)
    # The query and option fields this message sets: the first message must carry the query, and
    # later messages may carry documents only.
    fields_set: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class StreamBatch:
    """The scores of one stream message's documents, sent as soon as they are ready."""

    batch: int  # the message's position in the stream, from 0
    results: list[ScoredDocument]


_STREAM_END = object()


class StreamSession:
    """One rerank stream: each message's documents are scored as the message arrives, its scores go out
    as soon as they are ready, and the final ranking over every document comes last."""

    def __init__(self, reranker: Reranker, deadline: float | None) -> None:
        self.reranker = reranker
        self.deadline = deadline
        self.started_ns = time.monotonic_ns()
        self._seen_ids: dict[str, int] = {}
        self._documents_received = 0
        self._scored: list[ScoredDocument] = []
        self._usage = Usage()

    async def run(self, messages: AsyncIterator[StreamMessage]) -> AsyncIterator[StreamBatch | Ranking]:
        """Yield a StreamBatch per message that carried documents, in the order they finish, then the
        Ranking. The first error, from reading or from scoring, ends the stream."""
        first = await anext(messages, None)
        if first is None:
            raise InvalidArgument("the stream closed before its first message, which must carry the query")
        query, options = first.query, first.options
        spec = self.reranker.check_query(query, options)
        outbox: asyncio.Queue[object] = asyncio.Queue()
        scoring: set[asyncio.Task[None]] = set()

        async def score(batch: int, documents: Sequence[Document], offset: int) -> None:
            try:
                results, usage = await self.reranker.score(
                    query, documents, spec, options, self.deadline, offset
                )
            except Exception as exc:
                outbox.put_nowait(exc)
                return
            self._scored.extend(results)
            self._usage.add(usage)
            outbox.put_nowait(StreamBatch(batch, results))

        async def read() -> None:
            # Schedules each message's documents as it arrives, without waiting for the stream to end.
            try:
                message: StreamMessage | None = first
                batch = 0
                while message is not None:
                    if batch and message.fields_set:
                        raise InvalidArgument(
                            f"stream message {batch} sets {', '.join(sorted(message.fields_set))}; only "
                            "the first message may carry the query and options"
                        )
                    if message.documents:
                        offset = self._accept(message.documents)
                        task = asyncio.create_task(score(batch, message.documents, offset))
                        scoring.add(task)
                        task.add_done_callback(scoring.discard)
                    batch += 1
                    message = await anext(messages, None)
                await asyncio.gather(*scoring)
                outbox.put_nowait(_STREAM_END)
            except Exception as exc:
                outbox.put_nowait(exc)

        reader = asyncio.create_task(read())
        try:
            while (item := await outbox.get()) is not _STREAM_END:
                if isinstance(item, Exception):
                    raise item
                assert isinstance(item, StreamBatch)
                yield item
            yield self._final(options.top_n)
        finally:
            for task in (reader, *scoring):
                task.cancel()

    def _accept(self, documents: Sequence[Document]) -> int:
        """Validate a batch in arrival order and reserve its global indices; returns its first index."""
        offset = self._documents_received
        self.reranker.check_documents(documents, self._seen_ids, offset)
        self._documents_received += len(documents)
        return offset

    def _final(self, top_n: int) -> Ranking:
        if not self._scored:
            raise InvalidArgument("the stream carried no documents; send at least one document to rank")
        self._usage.total_ns = time.monotonic_ns() - self.started_ns
        return Ranking(rank(self._scored, top_n), self._usage)
