"""Running the configurations of ``rerank-client eval`` for every judged query."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from client.pipeline import PipelineOptions, TwoStagePipeline, blended
from client.retrieval.base import Mode, Retriever, SearchRequest
from client.sidecar_client import AsyncRerankClient

RECALL_DEPTH = 100  # Recall@100 needs every configuration to rank at least this many documents
BM25, DENSE, HYBRID, RERANK, BLEND = "bm25", "dense", "hybrid", "rerank", "blend"
CONFIGURATIONS = (BM25, DENSE, HYBRID, RERANK, BLEND)
DEFAULT_CONFIGURATIONS = (BM25, DENSE, HYBRID, RERANK)


@dataclass(frozen=True)
class QueryRun:
    ranking: list[str]  # document ids, best first
    timings_ms: dict[str, float]  # only the stages the configuration ran


class Evaluator:
    """Runs the chosen configurations for each query, one after another, with up to ``concurrency`` queries
    in flight (1: one at a time, so timings do not overlap).

    ``options`` are the pipeline's settings; ``options.candidates`` is N, the depth that gets reranked, and
    ``options.rerank_blend`` the blend configuration's weight of the rerank score.
    """

    def __init__(
        self,
        retriever: Retriever,
        sidecar: AsyncRerankClient,
        options: PipelineOptions,
        configurations: Sequence[str] = DEFAULT_CONFIGURATIONS,
        concurrency: int = 1,
    ) -> None:
        self.retriever = retriever
        self.sidecar = sidecar
        self.options = options
        self.configurations = list(configurations)
        self.concurrency = concurrency
        self.depth = max(RECALL_DEPTH, options.candidates)
        # Strict: a ranking the sidecar failed to rerank must not be scored as reranked. The blend is
        # computed from the same rerank scores, so the pipeline ranks by the reranker alone.
        self.pipeline = TwoStagePipeline(
            retriever,
            sidecar,
            options=replace(options, mode="hybrid", top_k=options.candidates, strict=True, rerank_blend=1.0),
        )

    async def run(self, query: str) -> dict[str, QueryRun]:
        wanted = set(self.configurations)
        runs = {}
        if BM25 in wanted:
            runs[BM25] = await self._stage_one(query, "bm25", None, 0.0)
        if not wanted - {BM25}:
            return runs
        started = time.perf_counter()
        embeddings = await self.sidecar.embed([query], timeout=self.options.embed_timeout)
        embed_ms = _ms_since(started)
        vector = embeddings.vectors[0]
        # Dense and hybrid share the query's one embedding call: their total is embed + retrieval.
        if DENSE in wanted:
            runs[DENSE] = await self._stage_one(query, "vector", vector, embed_ms)
        # The reranked rankings go on in hybrid order below the top N, as a reranked result list would.
        hybrid = []
        if HYBRID in wanted or (wanted & {RERANK, BLEND} and self.options.candidates < self.depth):
            runs[HYBRID] = await self._stage_one(query, "hybrid", vector, embed_ms)
            hybrid = runs[HYBRID].ranking
        if wanted & {RERANK, BLEND}:
            runs.update(await self._reranked(query, hybrid))
        return {key: run for key, run in runs.items() if key in wanted}

    async def run_all(
        self, queries: Mapping[str, str], on_query: Callable[[], None] = lambda: None
    ) -> dict[str, dict[str, QueryRun]]:
        """Query id -> configuration -> its run."""
        slots = asyncio.Semaphore(self.concurrency)

        async def run_one(query: str) -> dict[str, QueryRun]:
            async with slots:
                runs = await self.run(query)
            on_query()
            return runs

        results = await asyncio.gather(*(run_one(query) for query in queries.values()))
        return dict(zip(queries, results, strict=True))

    async def _reranked(self, query: str, hybrid: Sequence[str]) -> dict[str, QueryRun]:
        """The rerank configuration, and the blend computed from the same rerank scores."""
        response = await self.pipeline.search(query)
        scored = [(result.candidate, result.rerank_score or 0.0) for result in response.results]
        timings = response.timings
        timings_ms = {
            "embed": timings.embed_ms,
            "retrieval": timings.retrieval_ms,
            "rerank": timings.rerank_ms,  # overlaps retrieval: candidates stream in page by page
            "total": timings.total_ms,
        }
        runs = {}
        for key, order in ((RERANK, scored), (BLEND, blended(scored, self.options.rerank_blend))):
            ranked = [candidate.id for candidate, _ in order]
            seen = set(ranked)
            rest = [doc_id for doc_id in hybrid if doc_id not in seen]
            runs[key] = QueryRun((ranked + rest)[: self.depth], timings_ms)
        return runs

    async def _stage_one(
        self, query: str, mode: Mode, vector: np.ndarray | None, embed_ms: float
    ) -> QueryRun:
        request = self.options.search_request(query, mode, query_vector=vector, size=self.depth)
        started = time.perf_counter()
        ranking = await asyncio.to_thread(_ranked_ids, self.retriever, request)
        retrieval_ms = _ms_since(started)
        timings = {"embed": embed_ms} if vector is not None else {}
        return QueryRun(ranking, {**timings, "retrieval": retrieval_ms, "total": embed_ms + retrieval_ms})


def _ranked_ids(retriever: Retriever, request: SearchRequest) -> list[str]:
    return [candidate.id for page in retriever.candidate_pages(request) for candidate in page]


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
