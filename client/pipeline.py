"""The two-stage pipeline: stage-1 candidates stream into ``RerankStream`` while later pages are fetched."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace

import grpc
import numpy as np

from client.errors import ClientError, SidecarError
from client.fusion import Normalization, normalized
from client.retrieval.base import (
    Candidate,
    FilterValue,
    Fusion,
    FusionMethod,
    Mode,
    Retriever,
    SearchRequest,
)
from client.sidecar_client import AsyncRerankClient, Ranking, RerankOptions
from rerank.v1 import rerank_pb2

logger = logging.getLogger(__name__)

# The failures a search falls back to stage 1's order on: the sidecar is down, busy or slow, which passes.
# Any other (a request it refuses, a failure inside it) would fail every search the same way, unseen.
FALLBACK_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


class RerankFailed(ClientError):
    """The sidecar could not embed the query or rerank the candidates: in strict mode, or in a way that a
    fallback would hide (a request it refused, a failure inside it). It carries the exit code of the sidecar's
    error."""

    exit_code = SidecarError.exit_code

    def __init__(self, message: str, cause: SidecarError | None = None) -> None:
        super().__init__(message)
        if cause is not None:
            self.exit_code = cause.exit_code


@dataclass(frozen=True)
class PipelineOptions:
    candidates: int = 100  # stage-1 depth (N)
    batch_size: int = 32  # candidates per RerankStream message, and per retrieval page
    top_k: int = 10
    mode: Mode = "hybrid"
    fusion: Fusion = "client"
    fusion_method: FusionMethod = "rrf"
    rank_constant: int = 60
    bm25_weight: float = 1.0
    vector_weight: float = 1.0
    convex_weight: float = 0.5
    normalization: Normalization = "minmax"
    title_boost: float = 1.0
    num_candidates: int = 0
    # The final score: rerank_blend * rerank + (1 - rerank_blend) * stage 1's fused score, both min-max
    # normalized over the candidates. 1: the reranker's order alone.
    rerank_blend: float = 1.0
    # Deadlines in seconds: query embedding, and the whole rerank stream. None: the client's ``timeout``.
    embed_timeout: float | None = None
    rerank_timeout: float | None = None
    # False: when reranking fails because the sidecar is unreachable, overloaded or past its deadline, return
    # stage 1's order marked not reranked (any other rerank failure raises RerankFailed), and when the query
    # embedding fails, search with BM25 alone. True: raise RerankFailed for either.
    strict: bool = False
    rerank_options: RerankOptions = field(default_factory=RerankOptions)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rerank_blend <= 1.0:
            raise ValueError(f"rerank_blend must be between 0 and 1, got {self.rerank_blend}")

    def search_request(
        self,
        query: str,
        mode: Mode,
        *,
        query_vector: np.ndarray | None = None,
        embedding_model: str = "",
        size: int | None = None,
        filters: Mapping[str, FilterValue] | None = None,
    ) -> SearchRequest:
        """The stage-1 search these options make, ``size`` deep (default: ``candidates``). Fusion in
        Elasticsearch applies to hybrid searches only; a one-leg search fuses in the client. A search deeper
        than ``candidates`` (eval's, for Recall@100) raises ``num_candidates`` to its depth, the least
        Elasticsearch takes."""
        size = size or self.candidates
        return SearchRequest(
            query=query,
            query_vector=query_vector,
            mode=mode,
            size=size,
            page_size=self.batch_size,
            filters=filters or {},
            fusion=self.fusion if mode == "hybrid" else "client",
            fusion_method=self.fusion_method,
            rank_constant=self.rank_constant,
            bm25_weight=self.bm25_weight,
            vector_weight=self.vector_weight,
            convex_weight=self.convex_weight,
            normalization=self.normalization,
            title_boost=self.title_boost,
            num_candidates=max(self.num_candidates, size) if self.num_candidates else 0,
            embedding_model=embedding_model,
        )


@dataclass(frozen=True)
class StageTimings:
    embed_ms: float = 0.0
    first_page_ms: float = 0.0  # until the first candidates could be sent to the sidecar
    retrieval_ms: float = 0.0
    rerank_ms: float = 0.0  # from the stream's opening to its final ranking (overlaps retrieval)
    total_ms: float = 0.0


@dataclass(frozen=True)
class SearchResult:
    rank: int  # 1-based, final
    candidate: Candidate  # stage 1: its rank and BM25, vector and fused scores
    rerank_score: float | None  # stage 2; None when not reranked


@dataclass(frozen=True)
class NotReranked:
    reason: str


@dataclass(frozen=True)
class SearchResponse:
    query: str
    results: list[SearchResult]
    timings: StageTimings
    candidates: int  # how many stage 1 returned
    not_reranked: NotReranked | None = None  # set when stage 1's order is returned as is
    notes: list[str] = field(default_factory=list)  # degradations that still gave a reranked answer
    model_id: str = ""

    @property
    def reranked(self) -> bool:
        return self.not_reranked is None


class TwoStagePipeline:
    """Retrieve the top N, rerank them in the sidecar as they arrive, and return the top k.

    ``embedder`` embeds the query for the vector leg; it defaults to ``reranker`` (one sidecar serving both).
    """

    def __init__(
        self,
        retriever: Retriever,
        reranker: AsyncRerankClient,
        embedder: AsyncRerankClient | None = None,
        options: PipelineOptions | None = None,
    ) -> None:
        self.retriever = retriever
        self.reranker = reranker
        self.embedder = embedder or reranker
        self.options = options or PipelineOptions()

    async def search(
        self, query: str, *, filters: Mapping[str, FilterValue] | None = None, top_k: int | None = None
    ) -> SearchResponse:
        options = self.options if top_k is None else replace(self.options, top_k=top_k)
        started = time.perf_counter()
        notes: list[str] = []
        request, embed_ms = await self._search_request(query, filters or {}, options, notes)

        retrieval = _Retrieval(self.retriever, request)
        producer = asyncio.create_task(retrieval.run())
        ranking, failure, rerank_ms = None, None, 0.0
        try:
            if await retrieval.has_candidates():
                rerank_started = time.perf_counter()
                ranking, failure = await self._rerank(query, retrieval, options)
                rerank_ms = _ms_since(rerank_started)
        except asyncio.CancelledError:
            # The caller gave up: ask for no more pages (a page being fetched finishes on its thread).
            producer.cancel()
            raise
        finally:
            if not producer.done():
                await asyncio.wait([producer])  # collect every candidate, also when reranking failed
        producer.result()  # a retrieval error is the caller's error: there is nothing to return

        candidates = retrieval.candidates
        timings = StageTimings(
            embed_ms=embed_ms,
            first_page_ms=retrieval.first_page_ms,
            retrieval_ms=retrieval.total_ms,
            rerank_ms=rerank_ms,
            total_ms=_ms_since(started),
        )
        if ranking is not None:
            scored = [(candidates[result.index], result.score) for result in ranking.results]
            if options.rerank_blend < 1.0:
                scored = blended(scored, options.rerank_blend)[: options.top_k]
            results = [
                SearchResult(rank, candidate, score)
                for rank, (candidate, score) in enumerate(scored, start=1)
            ]
        else:
            results = [SearchResult(c.rank, c, None) for c in candidates[: options.top_k]]
        response = SearchResponse(
            query=query,
            results=results,
            timings=timings,
            candidates=len(candidates),
            not_reranked=NotReranked(failure) if failure else None,
            notes=notes,
            model_id=ranking.model_id if ranking else "",
        )
        _log(response)
        return response

    async def _search_request(
        self, query: str, filters: Mapping[str, FilterValue], options: PipelineOptions, notes: list[str]
    ) -> tuple[SearchRequest, float]:
        if options.mode == "bm25":
            return options.search_request(query, "bm25", filters=filters), 0.0
        started = time.perf_counter()
        try:
            embeddings = await self.embedder.embed([query], timeout=options.embed_timeout)
        except SidecarError as exc:
            reason = f"query embedding failed ({_describe(exc)})"
            if options.strict or options.mode == "vector":
                raise RerankFailed(f"query embedding failed: {exc}", exc) from exc
            notes.append(f"{reason}: the vector leg was skipped, stage 1 is BM25 only")
            return options.search_request(query, "bm25", filters=filters), _ms_since(started)
        request = options.search_request(
            query,
            options.mode,
            query_vector=embeddings.vectors[0],
            embedding_model=embeddings.model_id,
            filters=filters,
        )
        return request, _ms_since(started)

    async def _rerank(
        self, query: str, retrieval: _Retrieval, options: PipelineOptions
    ) -> tuple[Ranking | None, str | None]:
        """The final ranking, or why there is none (fail-open), or RerankFailed (strict)."""
        # A blend needs every candidate's rerank score: a low one may still end in the top k. Stage 1 sends at
        # most `candidates`, and a sidecar refuses a top_n above its per-request limit, whatever it was sent.
        top_n = min(options.top_k, options.candidates) if options.rerank_blend == 1.0 else 0
        rerank_options = replace(options.rerank_options, top_n=top_n)
        stream = self.reranker.rerank_stream(
            query, retrieval.batches(), rerank_options, timeout=options.rerank_timeout
        )
        try:
            async with aclosing(stream):
                async for item in stream:
                    if isinstance(item, Ranking):
                        return item, None
        except SidecarError as exc:
            if retrieval.error is not None:
                raise retrieval.error from exc  # the stream broke because retrieval did
            if options.strict or exc.code() not in FALLBACK_CODES:
                raise await self._rerank_failed(exc, len(retrieval.candidates)) from exc
            return None, f"reranking failed ({_describe(exc)})"
        raise RerankFailed("the sidecar closed the stream without a final ranking")

    async def _rerank_failed(self, exc: SidecarError, candidates: int) -> RerankFailed:
        """The error for a failed rerank stream. The sidecar refuses more candidates than it takes per stream
        with INVALID_ARGUMENT, which grpc.aio may report as a bare INTERNAL (grpc/grpc#36066), so after such a
        failure (never before a search) Info is asked for the limit, to name the setting to change."""
        if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL):
            try:
                limit = (await self.reranker.info()).limits.max_documents_per_request
            except SidecarError:
                limit = 0
            if 0 < limit < candidates:
                return RerankFailed(
                    f"reranking failed: the sidecar at {self.reranker.target} takes at most {limit} "
                    "documents per request (its --max-documents-per-request), and stage 1 found more: set "
                    f"--candidates to {limit} or fewer ({exc})",
                    exc,
                )
        return RerankFailed(f"reranking failed: {exc}", exc)


class _Retrieval:
    """Runs the retriever's page iterator on a worker thread and hands pages on as they arrive."""

    def __init__(self, retriever: Retriever, request: SearchRequest) -> None:
        self._retriever = retriever
        self._request = request
        self._pages: asyncio.Queue[list[Candidate] | None] = asyncio.Queue()
        self._first: list[Candidate] | None = None
        self.candidates: list[Candidate] = []
        self.error: BaseException | None = None
        self.first_page_ms = 0.0
        self.total_ms = 0.0

    async def run(self) -> None:
        started = time.perf_counter()
        try:
            pages: Iterator[list[Candidate]] = await asyncio.to_thread(
                self._retriever.candidate_pages, self._request
            )
            while (page := await asyncio.to_thread(next, pages, None)) is not None:
                if not self.candidates:
                    self.first_page_ms = _ms_since(started)
                self.candidates.extend(page)
                if page:
                    self._pages.put_nowait(page)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.total_ms = _ms_since(started)
            self._pages.put_nowait(None)

    async def has_candidates(self) -> bool:
        """Waits for the first page: a stream must not open without documents."""
        self._first = await self._pages.get()
        return self._first is not None

    async def batches(self) -> AsyncIterator[list[rerank_pb2.Document]]:
        page = self._first
        while page is not None:
            yield [rerank_pb2.Document(id=c.id, text=c.document.passage) for c in page]
            page = await self._pages.get()


def blended(scored: Sequence[tuple[Candidate, float]], rerank_weight: float) -> list[tuple[Candidate, float]]:
    """(candidate, rerank score) pairs ordered by ``rerank_weight * rerank + (1 - rerank_weight) * fused``,
    each score min-max normalized over the candidates; ties keep stage 1's order."""
    if not scored:
        return []
    rerank = normalized(np.array([score for _, score in scored], dtype=np.float64))
    fused = normalized(np.array([candidate.fused_score for candidate, _ in scored], dtype=np.float64))
    final = rerank_weight * rerank + (1.0 - rerank_weight) * fused
    order = sorted(range(len(scored)), key=lambda row: (-final[row], scored[row][0].rank))
    return [scored[row] for row in order]


def _describe(exc: SidecarError) -> str:
    return f"{exc.code().name}: {exc.details()}"


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def _log(response: SearchResponse) -> None:
    timings = response.timings
    outcome = f"not reranked ({response.not_reranked.reason})" if response.not_reranked else "reranked"
    logger.info(
        "search: %d candidates, %s; embed %.1f ms, first page %.1f ms, retrieval %.1f ms, rerank %.1f ms, "
        "total %.1f ms",
        response.candidates,
        outcome,
        timings.embed_ms,
        timings.first_page_ms,
        timings.retrieval_ms,
        timings.rerank_ms,
        timings.total_ms,
        extra={"fields": {"timings": vars(timings), "reranked": response.reranked}},
    )
