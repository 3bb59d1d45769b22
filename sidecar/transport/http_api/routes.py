"""The HTTP routes: each converts its API's JSON to the serving core's types and back, nothing more."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import uuid
from collections.abc import Sequence
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response

from sidecar import __version__
from sidecar.errors import InvalidArgument, ServingError
from sidecar.model.tokenization import Truncation
from sidecar.serving.core import ServingCore, ServingState
from sidecar.serving.embedding import Embedder
from sidecar.serving.reranking import Document, Ranking, Reranker, RerankOptions
from sidecar.settings import Settings
from sidecar.transport.calls import current_call, embedder_for, reranker_for
from sidecar.transport.http_api.openapi import (
    HEALTH_RESPONSES,
    INFO_ERRORS,
    METRICS_RESPONSES,
    call_errors,
    openapi_document,
)
from sidecar.transport.http_api.schemas import (
    CohereApiVersion,
    CohereBilledUnits,
    CohereDocument,
    CohereError,
    CohereMeta,
    CohereRerankResponse,
    CohereRerankResult,
    CohereRerankV1Request,
    CohereRerankV2Request,
    OpenAIEmbedding,
    OpenAIEmbeddingsRequest,
    OpenAIEmbeddingsResponse,
    OpenAIError,
    OpenAIUsage,
    TeiEmbedRequest,
    TeiError,
    TeiRank,
    TeiRerankRequest,
    TruncationDirection,
)
from sidecar.transport.http_api.status import (
    describe_validation_errors,
    error_response,
    http_error_response,
    internal_error_response,
)

# The routes that are calls: authenticated, counted, logged, and cancelled when their caller leaves.
# Health, metrics and the API docs stay open, as gRPC health does.
CALL_PATHS = frozenset({"/v1/rerank", "/v2/rerank", "/rerank", "/embed", "/v1/embeddings", "/info"})

_TRUNCATION = {
    TruncationDirection.RIGHT: Truncation.RIGHT,
    TruncationDirection.LEFT: Truncation.LEFT,
    TruncationDirection.RIGHT_LOWER: Truncation.RIGHT,
    TruncationDirection.LEFT_LOWER: Truncation.LEFT,
}
# Cohere bills one search unit per query with up to 100 documents.
_DOCUMENTS_PER_SEARCH_UNIT = 100


def build_app(core: ServingCore, settings: Settings) -> FastAPI:
    """The HTTP routes over ``core``; ``settings`` say whether /metrics is served and what the OpenAPI
    document states of limits and authentication."""
    app = FastAPI(
        title="rerank-sidecar",
        version=__version__,
        description="The sidecar's models over HTTP/JSON, in the shapes of Cohere's Rerank API, "
        "text-embeddings-inference and OpenAI's embeddings API. Send `X-Request-Timeout: <seconds>` "
        "for a deadline (504 once it passes); with --auth-token set, send `Authorization: Bearer <token>`. "
        "Errors come in each API's own shape.",
    )

    @app.exception_handler(ServingError)
    async def sidecar_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, ServingError)
        return error_response(request.url.path, error)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> Response:
        call = current_call.get(None)
        return internal_error_response(request.url.path, call.request_id if call else "(none)")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        return error_response(request.url.path, describe_validation_errors(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        return http_error_response(request.url.path, request.method, error)

    cohere_errors = call_errors(CohereError, chooses_model=True)
    tei_errors = call_errors(TeiError)

    @app.post("/v2/rerank", tags=["Cohere"], response_model_exclude_none=True, responses=cohere_errors)
    async def cohere_rerank_v2(body: CohereRerankV2Request) -> CohereRerankResponse:
        """Cohere's Rerank v2: ranks `documents` against `query`."""
        reranker = reranker_for(core, body.model)
        options = RerankOptions(
            top_n=body.top_n or 0, max_length=_pair_budget(reranker, body.max_tokens_per_doc)
        )
        ranking = await _rerank(reranker, body.query, body.documents, options)
        echoed = [CohereDocument(text=text) for text in body.documents] if body.return_documents else None
        return _cohere_response(ranking, "2", len(body.documents), reranker, echoed)

    @app.post("/v1/rerank", tags=["Cohere"], response_model_exclude_none=True, responses=cohere_errors)
    async def cohere_rerank_v1(body: CohereRerankV1Request) -> CohereRerankResponse:
        """Cohere's Rerank v1: documents as strings or objects; `rank_fields` picks the fields ranked,
        `return_documents` echoes each document's text, `max_chunks_per_doc` chunks long documents."""
        reranker = reranker_for(core, body.model)
        documents = [CohereDocument(text=d) if isinstance(d, str) else d for d in body.documents]
        texts = _cohere_v1_texts(documents, body.rank_fields)
        options = RerankOptions(
            top_n=body.top_n or 0,
            chunk=body.max_chunks_per_doc is not None,
            max_chunks_per_doc=body.max_chunks_per_doc or 0,
        )
        ranking = await _rerank(reranker, body.query, texts, options)
        echoed = documents if body.return_documents else None
        return _cohere_response(ranking, "1", len(texts), reranker, echoed)

    @app.post(
        "/rerank", tags=["text-embeddings-inference"], response_model_exclude_none=True, responses=tei_errors
    )
    async def tei_rerank(body: TeiRerankRequest) -> list[TeiRank]:
        """text-embeddings-inference's /rerank: `texts` ranked against `query`, best first."""
        reranker = reranker_for(core)
        options = RerankOptions(
            raw_scores=body.raw_scores,
            truncation=_TRUNCATION[body.truncation_direction],
            return_text=body.return_text,
            truncate=body.truncate is not False,
        )
        ranking = await _rerank(reranker, body.query, body.texts, options)
        return [
            TeiRank(index=result.index, score=result.score, text=result.text) for result in ranking.results
        ]

    if core.serves_embeddings:

        @app.post(
            "/embed",
            tags=["text-embeddings-inference"],
            response_model=list[list[float]],
            responses=tei_errors,
        )
        async def tei_embed(body: TeiEmbedRequest) -> Response:
            """text-embeddings-inference's /embed: one vector per input, in order."""
            embedder = embedder_for(core)
            _check_dimensions(embedder, body.dimensions)
            if not body.normalize and embedder.model.pooling.normalize:
                raise InvalidArgument(
                    "normalize: false is not available: this model normalizes its vectors itself (its "
                    "sentence-transformers Normalize module; Info: normalized)",
                    field="normalize",
                )
            texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
            embeddings = await embedder.embed(
                texts,
                0,
                _TRUNCATION[body.truncation_direction],
                current_call.get().deadline,
                normalize=body.normalize,
                truncate=body.truncate is not False,
            )
            current_call.get().usage = embeddings.usage
            return JSONResponse(embeddings.vectors.tolist())

        @app.post("/v1/embeddings", tags=["OpenAI"], responses=call_errors(OpenAIError, chooses_model=True))
        async def openai_embeddings(body: OpenAIEmbeddingsRequest) -> OpenAIEmbeddingsResponse:
            """OpenAI's embeddings API: `data[i].embedding` is the gRPC Embed vector of `input[i]`."""
            embedder = embedder_for(core, body.model)
            _check_dimensions(embedder, body.dimensions)
            texts = [body.input] if isinstance(body.input, str) else body.input
            embeddings = await embedder.embed(texts, 0, Truncation.RIGHT, current_call.get().deadline)
            current_call.get().usage = embeddings.usage
            if body.encoding_format == "base64":
                encoded: Sequence[list[float] | str] = [
                    base64.b64encode(vector.astype("<f4").tobytes()).decode() for vector in embeddings.vectors
                ]
            else:
                encoded = embeddings.vectors.tolist()
            tokens = embeddings.usage.tokens
            return OpenAIEmbeddingsResponse(
                data=[OpenAIEmbedding(index=index, embedding=vector) for index, vector in enumerate(encoded)],
                model=embedder.model.source.model_id,
                usage=OpenAIUsage(prompt_tokens=tokens, total_tokens=tokens),
            )

    # HEAD too (undocumented, as HEAD is for any GET): uptime monitors and some load balancers check with it.
    @app.head("/health", include_in_schema=False)
    @app.get("/health", tags=["Server"], responses=HEALTH_RESPONSES)
    async def health() -> Response:
        """200 while the models serve; 503 while they load, and once the server drains."""
        serving = core.state is ServingState.SERVING
        return JSONResponse({"status": core.state.value}, status_code=200 if serving else 503)

    @app.get("/info", tags=["Server"], response_model=dict[str, Any], responses=INFO_ERRORS)
    async def info() -> Response:
        """The models, engines and limits, as the gRPC Info call reports them."""
        return JSONResponse(dataclasses.asdict(core.info()))

    if settings.http_metrics:

        @app.get("/metrics", tags=["Server"], response_class=PlainTextResponse, responses=METRICS_RESPONSES)
        async def metrics() -> Response:
            """Prometheus metrics, the same as on --metrics-port."""
            return Response(generate_latest(core.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.openapi = partial(openapi_document, app, core, settings)  # type: ignore[method-assign]
    return app


def _check_dimensions(embedder: Embedder, dimensions: int | None) -> None:
    if dimensions is not None and dimensions != embedder.model.dims:
        raise InvalidArgument(
            f"dimensions {dimensions} is not supported: {embedder.model.source.model_id} has "
            f"{embedder.model.dims}; leave it unset",
            field="dimensions",
        )


def _cohere_v1_texts(documents: Sequence[CohereDocument], rank_fields: Sequence[str] | None) -> list[str]:
    """Each document's text: its `text`, or with `rank_fields` a `field: value` line per field it has."""
    texts = []
    for index, document in enumerate(documents):
        fields = document.model_dump()
        if rank_fields is None:
            texts.append(fields["text"])
            continue
        lines = []
        for name in rank_fields:
            if name not in fields:
                continue
            value = fields[name]
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            try:
                text.encode()
            except UnicodeEncodeError:
                raise InvalidArgument(
                    f"documents[{index}].{name} holds a lone UTF-16 surrogate; send valid Unicode text",
                    field=f"documents[{index}].{name}",
                ) from None
            lines.append(f"{name}: {text}")
        texts.append("\n".join(lines))
    return texts


def _pair_budget(reranker: Reranker, max_tokens_per_doc: int | None) -> int:
    """Cohere's per-document token cap as the pair's max_length: 0 (the model's limit) when the cap is
    above it, and never below the fewest tokens a pair needs (Cohere truncates rather than refuses)."""
    if max_tokens_per_doc is None or max_tokens_per_doc >= reranker.model.max_length:
        return 0
    return max(max_tokens_per_doc, reranker.model.tokenizer.min_max_length())


async def _rerank(reranker: Reranker, query: str, texts: Sequence[str], options: RerankOptions) -> Ranking:
    call = current_call.get()
    documents = [Document(id="", text=text) for text in texts]
    ranking = await reranker.rerank(query, documents, options, call.deadline)
    call.usage = ranking.usage
    return ranking


def _cohere_response(
    ranking: Ranking,
    api_version: str,
    documents: int,
    reranker: Reranker,
    echoed: Sequence[CohereDocument] | None,
) -> CohereRerankResponse:
    results = [
        CohereRerankResult(
            index=result.index,
            relevance_score=result.score,
            document=None if echoed is None else echoed[result.index],
        )
        for result in ranking.results
    ]
    search_units = math.ceil(documents / _DOCUMENTS_PER_SEARCH_UNIT)
    return CohereRerankResponse(
        id=str(uuid.uuid4()),
        results=results,
        meta=CohereMeta(
            api_version=CohereApiVersion(version=api_version),
            billed_units=CohereBilledUnits(search_units=search_units),
        ),
        model=reranker.model.source.model_id,
    )
