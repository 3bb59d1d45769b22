"""The Reranker servicer: converts protobuf to the request layer's types and back, nothing more."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from rerank.v1 import rerank_pb2, rerank_pb2_grpc
from sidecar.errors import InvalidArgument
from sidecar.model.tokenization import Truncation
from sidecar.scheduling.embedder import Embedder
from sidecar.scheduling.reranker import (
    Document,
    Ranking,
    Reranker,
    RerankOptions,
    ScoredDocument,
    StreamSession,
    Usage,
)
from sidecar.transport.interceptors import current_call

_TRUNCATION = {
    rerank_pb2.TRUNCATION_DIRECTION_RIGHT: Truncation.RIGHT,
    rerank_pb2.TRUNCATION_DIRECTION_LEFT: Truncation.LEFT,
}
_CHUNK = {rerank_pb2.LONG_DOCUMENTS_TRUNCATE: False, rerank_pb2.LONG_DOCUMENTS_CHUNK: True}
# Fields a stream's later messages must leave unset: everything but the documents.
_FIRST_MESSAGE_ONLY = frozenset(rerank_pb2.RerankStreamRequest.DESCRIPTOR.fields_by_name) - {"documents"}


def options_from(message: rerank_pb2.RerankRequest | rerank_pb2.RerankStreamRequest) -> RerankOptions:
    """Options from a RerankRequest or a stream's first message (they share the field names)."""
    return RerankOptions(
        top_n=message.top_n,
        raw_scores=message.raw_scores,
        max_length=message.max_length,
        truncation=_enum_value(_TRUNCATION, message.truncation_direction, "truncation_direction"),
        chunk=_enum_value(_CHUNK, message.long_documents, "long_documents"),
        max_chunks_per_doc=message.max_chunks_per_doc,
        chunk_overlap=message.chunk_overlap,
        return_text=message.return_text,
        instruction=message.instruction,
    )


def _enum_value(mapping: dict[int, Any], value: int, field: str) -> Any:
    if value not in mapping:
        raise InvalidArgument(f"{field} has unknown value {value}; known values are {sorted(mapping)}")
    return mapping[value]


def documents_from(documents: Sequence[rerank_pb2.Document]) -> list[Document]:
    return [Document(id=document.id, text=document.text) for document in documents]


def results_to_proto(results: Sequence[ScoredDocument]) -> list[rerank_pb2.Result]:
    return [
        rerank_pb2.Result(index=result.index, id=result.id, score=result.score, text=result.text)
        for result in results
    ]


def usage_to_proto(usage: Usage) -> rerank_pb2.Usage:
    return rerank_pb2.Usage(
        pairs=usage.pairs,
        chunks=usage.chunks,
        tokens=usage.tokens,
        batches=usage.batches,
        queue_ns=usage.queue_ns,
        tokenization_ns=usage.tokenization_ns,
        inference_ns=usage.inference_ns,
        total_ns=usage.total_ns,
    )


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


_STREAM_END = object()


class RerankerServicer(rerank_pb2_grpc.RerankerServicer):
    def __init__(self, reranker: Callable[[], Reranker], info: Callable[[], rerank_pb2.InfoResponse]) -> None:
        # Both are looked up per call: the model loads after the server starts listening.
        self._reranker = reranker
        self._info = info

    async def Rerank(
        self, request: rerank_pb2.RerankRequest, context: grpc.aio.ServicerContext
    ) -> rerank_pb2.RerankResponse:
        reranker = self._reranker()
        ranking = await reranker.rerank(
            request.query, documents_from(request.documents), options_from(request), deadline_of(context)
        )
        current_call.get().usage = ranking.usage
        return self._response(rerank_pb2.RerankResponse, ranking, reranker)

    async def RerankStream(
        self,
        request_iterator: AsyncIterator[rerank_pb2.RerankStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[rerank_pb2.RerankStreamResponse]:
        reranker = self._reranker()
        first = await anext(request_iterator, None)
        if first is None:
            raise InvalidArgument("the stream closed before its first message, which must carry the query")
        session = StreamSession.open(reranker, first.query, options_from(first), deadline_of(context))
        outbox: asyncio.Queue[Any] = asyncio.Queue()
        scoring: set[asyncio.Task[None]] = set()

        async def score(batch: int, documents: list[Document], offset: int) -> None:
            try:
                results = await session.score_batch(documents, offset)
            except Exception as exc:
                outbox.put_nowait(exc)
                return
            scores = rerank_pb2.BatchScores(batch=batch, results=results_to_proto(results))
            outbox.put_nowait(rerank_pb2.RerankStreamResponse(batch_scores=scores))

        async def read() -> None:
            # Schedules each message's documents as it arrives, without waiting for the stream to end.
            try:
                message: rerank_pb2.RerankStreamRequest | None = first
                batch = 0
                while message is not None:
                    if batch and (extra := {f.name for f, _ in message.ListFields()} & _FIRST_MESSAGE_ONLY):
                        raise InvalidArgument(
                            f"stream message {batch} sets {', '.join(sorted(extra))}; only the first "
                            "message may carry the query and options"
                        )
                    if message.documents:
                        documents = documents_from(message.documents)
                        offset = session.accept(documents)
                        task = asyncio.create_task(score(batch, documents, offset))
                        scoring.add(task)
                        task.add_done_callback(scoring.discard)
                    batch += 1
                    message = await anext(request_iterator, None)
                await asyncio.gather(*scoring)
                outbox.put_nowait(_STREAM_END)
            except Exception as exc:
                outbox.put_nowait(exc)

        reader = asyncio.create_task(read())
        try:
            while (item := await outbox.get()) is not _STREAM_END:
                if isinstance(item, Exception):
                    raise item
                yield item
            ranking = session.final()
            current_call.get().usage = ranking.usage
            yield rerank_pb2.RerankStreamResponse(
                final=self._response(rerank_pb2.FinalRanking, ranking, reranker)
            )
        finally:
            for task in (reader, *scoring):
                task.cancel()

    async def Info(
        self, request: rerank_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> rerank_pb2.InfoResponse:
        return self._info()

    @staticmethod
    def _response(message_type: Any, ranking: Ranking, reranker: Reranker) -> Any:
        return message_type(
            results=results_to_proto(ranking.results),
            usage=usage_to_proto(ranking.usage),
            model_id=reranker.model.source.model_id,
        )


class EmbedderServicer(rerank_pb2_grpc.EmbedderServicer):
    def __init__(self, embedder: Callable[[], Embedder]) -> None:
        self._embedder = embedder

    async def Embed(
        self, request: rerank_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> rerank_pb2.EmbedResponse:
        embedder = self._embedder()
        truncation = _enum_value(_TRUNCATION, request.truncation_direction, "truncation_direction")
        embeddings = await embedder.embed(
            list(request.texts), request.max_length, truncation, deadline_of(context)
        )
        current_call.get().usage = embeddings.usage
        return rerank_pb2.EmbedResponse(
            embeddings=[rerank_pb2.Embedding(values=vector) for vector in embeddings.vectors.tolist()],
            dims=embeddings.vectors.shape[1],
            model_id=embedder.model.source.model_id,
            usage=usage_to_proto(embeddings.usage),
        )
