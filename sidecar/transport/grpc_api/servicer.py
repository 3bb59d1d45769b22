"""The gRPC servicers: they convert protobuf to the serving core's types and back, nothing more."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from rerank.v1 import rerank_pb2, rerank_pb2_grpc
from sidecar.errors import InvalidArgument
from sidecar.model.tokenization import Truncation
from sidecar.serving.core import ServingCore
from sidecar.serving.info import EmbeddingInfo, RankingInfo, ScoreCacheInfo, SelectionInfo, ServingInfo
from sidecar.serving.reranking import (
    Document,
    Ranking,
    RerankOptions,
    ScoredDocument,
    StreamBatch,
    StreamMessage,
    StreamSession,
)
from sidecar.serving.usage import Usage
from sidecar.transport.calls import current_call, embedder_for, reranker_for

_TRUNCATION = {
    rerank_pb2.TRUNCATION_DIRECTION_RIGHT: Truncation.RIGHT,
    rerank_pb2.TRUNCATION_DIRECTION_LEFT: Truncation.LEFT,
}
_CHUNK = {rerank_pb2.LONG_DOCUMENTS_TRUNCATE: False, rerank_pb2.LONG_DOCUMENTS_CHUNK: True}


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
        cached_pairs=usage.cached_pairs,
    )


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def stream_message_from(message: rerank_pb2.RerankStreamRequest) -> StreamMessage:
    return StreamMessage(
        documents=documents_from(message.documents),
        query=message.query,
        options=options_from(message),
        fields_set=frozenset(field.name for field, _ in message.ListFields()) - {"documents"},
    )


async def stream_messages_from(
    requests: AsyncIterator[rerank_pb2.RerankStreamRequest],
) -> AsyncIterator[StreamMessage]:
    async for message in requests:
        yield stream_message_from(message)


def selection_to_proto(selection: SelectionInfo) -> rerank_pb2.EngineSelection:
    return rerank_pb2.EngineSelection(
        from_cache=selection.from_cache,
        lossy_margin=selection.lossy_margin,
        speedup_over_lossless=selection.speedup_over_lossless,
        timings=[
            rerank_pb2.CandidateTiming(candidate=candidate, rows_per_second=speed)
            for candidate, speed in selection.timings.items()
        ],
        hardware=selection.hardware,
    )


def embedding_info_to_proto(embedding: EmbeddingInfo) -> rerank_pb2.EmbeddingModelInfo:
    return rerank_pb2.EmbeddingModelInfo(
        model_id=embedding.model_id,
        dims=embedding.dims,
        pooling=embedding.pooling,
        normalized=embedding.normalized,
        max_length=embedding.max_length,
        engine=embedding.engine,
        precision=embedding.precision,
        device=embedding.device,
        compiled=embedding.compiled,
        selection=selection_to_proto(embedding.selection),
    )


def score_cache_to_proto(cache: ScoreCacheInfo) -> rerank_pb2.ScoreCacheInfo:
    return rerank_pb2.ScoreCacheInfo(
        serves=cache.serves,
        max_pairs=cache.max_pairs,
        pairs=cache.pairs,
        why_not_serving=cache.why_not_serving,
    )


def info_to_proto(info: ServingInfo) -> rerank_pb2.InfoResponse:
    ranking: RankingInfo = info.ranking
    response = rerank_pb2.InfoResponse(
        model_id=ranking.model_id,
        model_revision=ranking.model_revision,
        model_kind=ranking.model_kind,
        engine=ranking.engine,
        precision=ranking.precision,
        device=ranking.device,
        max_length=ranking.max_length,
        num_labels=ranking.num_labels,
        limits=rerank_pb2.BatchingLimits(
            max_batch_tokens=ranking.max_batch_tokens,
            batch_workers=ranking.batch_workers,
            max_batch_pairs=ranking.max_batch_pairs,
            max_queued_pairs=ranking.max_queued_pairs,
            max_documents_per_request=ranking.max_documents_per_request,
            max_chunks_per_doc=ranking.max_chunks_per_doc,
        ),
        server_version=info.server_version,
        engine_notes=list(ranking.engine_notes),
        compiled=ranking.compiled,
        selection=selection_to_proto(ranking.selection),
        model_family=ranking.model_family,
        instruction=ranking.instruction,
        score_cache=score_cache_to_proto(ranking.score_cache),
        tokenize_in=info.tokenize_in,
        tokenizer_workers=info.tokenizer_workers,
    )
    if info.embedding is not None:
        response.embedding_model.CopyFrom(embedding_info_to_proto(info.embedding))
    response.models.extend(
        rerank_pb2.ServedModel(
            name=model.name,
            service=model.service,
            is_default=model.default,
            model_id=model.model_id,
            model_kind=model.model_kind,
            model_family=model.model_family,
            engine=model.engine,
            precision=model.precision,
            device=model.device,
            compiled=model.compiled,
            max_length=model.max_length,
            max_batch_tokens=model.max_batch_tokens,
            max_batch_pairs=model.max_batch_pairs,
            batch_workers=model.batch_workers,
            score_cache=None if model.score_cache is None else score_cache_to_proto(model.score_cache),
            dims=model.dims,
            pooling=model.pooling,
            normalized=model.normalized,
        )
        for model in info.models
    )
    return response


class RerankerServicer(rerank_pb2_grpc.RerankerServicer):
    def __init__(self, core: ServingCore) -> None:
        self._core = core

    async def Rerank(
        self, request: rerank_pb2.RerankRequest, context: grpc.aio.ServicerContext
    ) -> rerank_pb2.RerankResponse:
        reranker = reranker_for(self._core, request.model)
        ranking = await reranker.rerank(
            request.query, documents_from(request.documents), options_from(request), deadline_of(context)
        )
        current_call.get().usage = ranking.usage
        return _ranking_to_proto(rerank_pb2.RerankResponse, ranking, reranker.model.source.model_id)

    async def RerankStream(
        self,
        request_iterator: AsyncIterator[rerank_pb2.RerankStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[rerank_pb2.RerankStreamResponse]:
        requests = aiter(request_iterator)
        first = await anext(requests, None)  # its model field chooses the reranker
        reranker = reranker_for(self._core, first.model if first is not None else "")
        session = StreamSession(reranker, deadline_of(context))
        async for item in session.run(stream_messages_from(_starting_with(first, requests))):
            if isinstance(item, StreamBatch):
                scores = rerank_pb2.BatchScores(batch=item.batch, results=results_to_proto(item.results))
                yield rerank_pb2.RerankStreamResponse(batch_scores=scores)
                continue
            current_call.get().usage = item.usage
            final = _ranking_to_proto(rerank_pb2.FinalRanking, item, reranker.model.source.model_id)
            yield rerank_pb2.RerankStreamResponse(final=final)

    async def Info(
        self, request: rerank_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> rerank_pb2.InfoResponse:
        return info_to_proto(self._core.info())


async def _starting_with(
    first: rerank_pb2.RerankStreamRequest | None, rest: AsyncIterator[rerank_pb2.RerankStreamRequest]
) -> AsyncIterator[rerank_pb2.RerankStreamRequest]:
    if first is None:
        return
    yield first
    async for message in rest:
        yield message


def _ranking_to_proto(message_type: Any, ranking: Ranking, model_id: str) -> Any:
    return message_type(
        results=results_to_proto(ranking.results), usage=usage_to_proto(ranking.usage), model_id=model_id
    )


class EmbedderServicer(rerank_pb2_grpc.EmbedderServicer):
    def __init__(self, core: ServingCore) -> None:
        self._core = core

    async def Embed(
        self, request: rerank_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> rerank_pb2.EmbedResponse:
        embedder = embedder_for(self._core, request.model)
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
