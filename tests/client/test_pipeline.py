"""The two-stage pipeline: candidates from Elasticsearch stream into the in-process sidecar."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from client.documents import Document
from client.pipeline import PipelineOptions, RerankFailed, TwoStagePipeline, blended
from client.retrieval.base import Candidate, SearchRequest
from client.retrieval.elasticsearch import ElasticsearchRetriever
from client.retrieval.embedded import EmbeddedRetriever
from client.sidecar_client import AsyncRerankClient, Ranking, RerankOptions, ScoredDocument, Usage
from rerank.v1 import rerank_pb2
from tests.client.conftest import RunningEmbedder, fake_vector
from tests.conftest import RunningSidecar, running_sidecar

QUERY = "brain neuron memory dopamine"


def address(sidecar: RunningSidecar) -> str:
    return f"127.0.0.1:{sidecar.server.port}"


async def test_results_carry_both_stages_scores_and_timings(
    sidecar: RunningSidecar, fake_embedder: RunningEmbedder, es_corpus_index: ElasticsearchRetriever
):
    options = PipelineOptions(candidates=50, batch_size=16, top_k=5, rerank_timeout=60)
    async with (
        AsyncRerankClient(address(sidecar)) as reranker,
        AsyncRerankClient(fake_embedder.target) as embedder,
    ):
        response = await TwoStagePipeline(es_corpus_index, reranker, embedder, options).search(QUERY)

    assert response.reranked
    assert response.candidates == 50
    assert [r.rank for r in response.results] == [1, 2, 3, 4, 5]
    scores = [r.rerank_score for r in response.results]
    assert scores == sorted(scores, reverse=True)  # type: ignore[type-var]
    stage1_request = SearchRequest(query=QUERY, query_vector=fake_vector(QUERY), size=50)
    stage1 = [c for page in es_corpus_index.candidate_pages(stage1_request) for c in page]
    stage1_rank = {c.id: c.rank for c in stage1}
    for result in response.results:
        candidate = result.candidate
        assert candidate.rank == stage1_rank[candidate.id]
        assert candidate.fused_score > 0
        assert candidate.bm25_score is not None or candidate.vector_score is not None
    timings = response.timings
    assert 0 < timings.first_page_ms <= timings.retrieval_ms <= timings.total_ms
    assert 0 < timings.rerank_ms <= timings.total_ms
    assert timings.embed_ms > 0


async def test_a_top_k_above_the_candidates_asks_the_sidecar_for_no_more_than_them(
    sidecar: RunningSidecar, fake_embedder: RunningEmbedder, es_corpus_index: ElasticsearchRetriever
):
    # 5000 is above the sidecar's max_documents_per_request (1000): sent as top_n, the stream was refused.
    options = PipelineOptions(candidates=10, top_k=5000, rerank_timeout=60, strict=True)
    async with (
        AsyncRerankClient(address(sidecar)) as reranker,
        AsyncRerankClient(fake_embedder.target) as embedder,
    ):
        response = await TwoStagePipeline(es_corpus_index, reranker, embedder, options).search(QUERY)
    assert response.reranked
    assert len(response.results) == 10


class WaitsBeforeTheLastPage:
    """Wraps a retriever: before fetching the last page it waits until the sidecar's model has run a batch of
    this search. Without overlap the pipeline would send only after the last page, and the wait would fail."""

    def __init__(self, inner: ElasticsearchRetriever, sidecar: RunningSidecar) -> None:
        self.inner = inner
        self.sidecar = sidecar
        self.events: list[str] = []

    def candidate_pages(self, request: SearchRequest) -> Iterator[list[Candidate]]:
        batches_before = len(self.sidecar.engine.batches)
        pages = self.inner.candidate_pages(request)
        total = -(-request.size // request.page_size)
        for number in range(total):
            if number == total - 1:
                seen = threading.Event()
                for _ in range(500):
                    if len(self.sidecar.engine.batches) > batches_before:
                        seen.set()
                        break
                    seen.wait(0.02)
                self.events.append("sidecar scored a batch" if seen.is_set() else "sidecar idle")
            page = next(pages)
            self.events.append(f"fetched page {number + 1}")
            yield page


async def test_scoring_starts_before_retrieval_ends(
    sidecar: RunningSidecar, es_corpus_index: ElasticsearchRetriever
):
    retriever = WaitsBeforeTheLastPage(es_corpus_index, sidecar)
    options = PipelineOptions(candidates=96, batch_size=32, mode="bm25", rerank_timeout=60)
    async with AsyncRerankClient(address(sidecar)) as reranker:
        # "the" is in nearly every document: enough BM25 hits for three full pages.
        pipeline = TwoStagePipeline(retriever, reranker, options=options)  # type: ignore[arg-type]
        response = await pipeline.search("study results patients effect brain")

    assert retriever.events == [
        "fetched page 1",
        "fetched page 2",
        "sidecar scored a batch",
        "fetched page 3",
    ]
    assert response.reranked
    assert response.candidates == 96


async def test_fails_open_when_the_sidecar_is_down(
    tiny_bert: Path, fake_embedder: RunningEmbedder, es_corpus_index: ElasticsearchRetriever
):
    async with running_sidecar(tiny_bert, embed_model="") as stopped:
        dead = address(stopped)
    options = PipelineOptions(candidates=30, top_k=7, rerank_timeout=5)
    async with (
        AsyncRerankClient(dead, max_attempts=2) as reranker,
        AsyncRerankClient(fake_embedder.target) as embedder,
    ):
        response = await TwoStagePipeline(es_corpus_index, reranker, embedder, options).search(QUERY)

        assert not response.reranked
        assert response.not_reranked is not None
        assert "UNAVAILABLE" in response.not_reranked.reason
        assert [r.candidate.rank for r in response.results] == list(range(1, 8))
        assert all(r.rerank_score is None for r in response.results)

        strict = PipelineOptions(candidates=30, rerank_timeout=5, strict=True)
        with pytest.raises(RerankFailed, match="UNAVAILABLE"):
            await TwoStagePipeline(es_corpus_index, reranker, embedder, strict).search(QUERY)


async def test_without_query_vectors_it_falls_back_to_bm25_and_says_so(
    tiny_bert: Path, sidecar: RunningSidecar, es_corpus_index: ElasticsearchRetriever
):
    async with running_sidecar(tiny_bert, embed_model="") as stopped:
        dead = address(stopped)
    async with (
        AsyncRerankClient(address(sidecar)) as reranker,
        AsyncRerankClient(dead, max_attempts=2) as embedder,
    ):
        response = await TwoStagePipeline(
            es_corpus_index, reranker, embedder, PipelineOptions(candidates=20, rerank_timeout=60)
        ).search(QUERY)
    assert response.reranked
    assert any("BM25 only" in note for note in response.notes)
    assert all(r.candidate.vector_score is None for r in response.results)


async def test_fails_open_when_the_deadline_passes(
    sidecar: RunningSidecar, es_corpus_index: ElasticsearchRetriever
):
    options = PipelineOptions(candidates=20, mode="bm25", rerank_timeout=0.3)
    sidecar.engine.open.clear()
    try:
        async with AsyncRerankClient(address(sidecar)) as reranker:
            response = await TwoStagePipeline(es_corpus_index, reranker, options=options).search(QUERY)
    finally:
        sidecar.engine.open.set()
    assert response.not_reranked is not None
    assert "DEADLINE_EXCEEDED" in response.not_reranked.reason
    assert len(response.results) == 10


def _candidate(doc_id: str, rank: int, fused: float) -> Candidate:
    return Candidate(document=Document(doc_id, "text"), rank=rank, fused_score=fused)


def test_a_blend_mixes_normalized_rerank_and_stage_one_scores():
    # Stage 1 puts a first, the reranker b; each normalized over the candidates to [0, 1].
    scored = [
        (_candidate("b", 2, 0.02), 0.9),
        (_candidate("c", 3, 0.01), 0.5),
        (_candidate("a", 1, 0.03), 0.1),
    ]
    order = lambda weight: [candidate.id for candidate, _ in blended(scored, weight)]  # noqa: E731
    assert order(1.0) == ["b", "c", "a"]
    assert order(0.0) == ["a", "b", "c"]
    # 0.6: b 0.6 x 1 + 0.4 x 0.5 = 0.8, a 0 + 0.4 = 0.4, c 0.6 x 0.5 + 0 = 0.3.
    assert order(0.6) == ["b", "a", "c"]
    assert [score for _, score in blended(scored, 0.6)] == [0.9, 0.1, 0.5]  # the reranker's scores stay


async def test_a_blended_search_returns_top_k_of_every_candidates_blend(
    sidecar: RunningSidecar, es_corpus_index: ElasticsearchRetriever
):
    common = PipelineOptions(candidates=30, top_k=5, mode="bm25", rerank_timeout=60)
    async with AsyncRerankClient(address(sidecar)) as reranker:
        everything = await TwoStagePipeline(
            es_corpus_index, reranker, options=replace(common, top_k=30)
        ).search(QUERY)
        blend = await TwoStagePipeline(
            es_corpus_index, reranker, options=replace(common, rerank_blend=0.5)
        ).search(QUERY)
    expected = blended([(r.candidate, r.rerank_score or 0.0) for r in everything.results], 0.5)[:5]
    assert [r.candidate.id for r in blend.results] == [candidate.id for candidate, _ in expected]
    assert [r.rank for r in blend.results] == [1, 2, 3, 4, 5]


def test_search_requests_come_from_the_options():
    options = PipelineOptions(candidates=40, fusion="elasticsearch", fusion_method="rrf", title_boost=2.0)
    hybrid = options.search_request("q", "hybrid", query_vector=fake_vector("q"), size=100)
    assert (hybrid.size, hybrid.fusion, hybrid.title_boost) == (100, "elasticsearch", 2.0)
    assert (
        options.search_request("q", "bm25").fusion == "client"
    )  # one leg: nothing for Elasticsearch to fuse
    with pytest.raises(ValueError, match="rerank_blend"):
        PipelineOptions(rerank_blend=1.5)


def test_num_candidates_is_at_least_the_depth_searched_and_its_default_at_most_elasticsearchs_limit():
    options = PipelineOptions(candidates=20, num_candidates=50)
    assert options.search_request("q", "bm25").num_candidates == 50
    assert options.search_request("q", "bm25", size=100).num_candidates == 100  # eval's Recall@100 depth
    assert PipelineOptions(candidates=20).search_request("q", "bm25", size=100).num_candidates == 0
    default = {size: SearchRequest("q", mode="bm25", size=size).knn_num_candidates for size in (100, 6000)}
    assert default == {100: 200, 6000: 10_000}


@pytest.mark.parametrize(
    ("limits", "rerank_options", "named"),
    [
        # Refused with INVALID_ARGUMENT, which grpc.aio may report as INTERNAL ("Internal error from Core").
        ({"max_documents_per_request": 20}, RerankOptions(), ["at most 20", "--candidates to 20"]),
        ({}, RerankOptions(max_length=100_000), ["RerankStream"]),
    ],
)
async def test_a_request_the_sidecar_refuses_fails_the_search_instead_of_falling_back(
    tiny_bert: Path,
    embedded_corpus_index: EmbeddedRetriever,
    limits: dict[str, int],
    rerank_options: RerankOptions,
    named: list[str],
):
    options = PipelineOptions(candidates=30, batch_size=8, mode="bm25", rerank_options=rerank_options)
    async with (
        running_sidecar(tiny_bert, **limits) as limited,
        AsyncRerankClient(address(limited)) as reranker,
    ):
        with pytest.raises(RerankFailed, match="reranking failed") as caught:
            await TwoStagePipeline(embedded_corpus_index, reranker, options=options).search(QUERY)
    assert caught.value.exit_code == 13
    for name in named:
        assert name in str(caught.value)


async def test_the_clients_timeout_is_the_deadline_unless_the_options_set_one(
    sidecar: RunningSidecar, fake_embedder: RunningEmbedder, embedded_corpus_index: EmbeddedRetriever
):
    strict = PipelineOptions(candidates=20, strict=True)
    async with (
        AsyncRerankClient(address(sidecar), timeout=0.3) as reranker,
        AsyncRerankClient(fake_embedder.target, timeout=0.3) as embedder,
    ):
        pipeline = TwoStagePipeline(embedded_corpus_index, reranker, embedder, strict)
        fake_embedder.servicer.delay_s = 30.0
        try:
            with pytest.raises(RerankFailed, match=r"Embed within the 0\.3 s deadline"):
                await pipeline.search(QUERY)
        finally:
            fake_embedder.servicer.delay_s = 0.0
        sidecar.engine.open.clear()  # hold the model: the stream cannot finish in time
        try:
            with pytest.raises(RerankFailed, match=r"RerankStream within the 0\.3 s deadline"):
                await pipeline.search(QUERY)
            explicit = replace(strict, rerank_timeout=0.2)
            with pytest.raises(RerankFailed, match=r"RerankStream within the 0\.2 s deadline"):
                await TwoStagePipeline(embedded_corpus_index, reranker, embedder, explicit).search(QUERY)
        finally:
            sidecar.engine.open.set()


class SlowPages:
    """Five pages of two candidates; from the second on, each waits for ``gate``. Counts pages asked for."""

    def __init__(self) -> None:
        self.asked = 0
        self.second_asked = threading.Event()
        self.gate = threading.Event()

    def candidate_pages(self, request: SearchRequest) -> Iterator[list[Candidate]]:
        for number in range(5):
            self.asked += 1
            if number:
                self.second_asked.set()
                self.gate.wait()
            yield [_candidate(f"doc-{number}-{row}", 2 * number + row + 1, 1.0) for row in range(2)]


class RanksAtTheEnd:
    """A reranker that reads every batch and answers once the stream ends."""

    async def rerank_stream(
        self,
        query: str,
        batches: AsyncIterable[Sequence[rerank_pb2.Document]],
        options: RerankOptions,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncIterator[Ranking]:
        documents = [document async for batch in batches for document in batch]
        results = [ScoredDocument(index, document.id, 0.0) for index, document in enumerate(documents)]
        yield Ranking(results, Usage(len(documents), 0, 0, 0, 0.0, 0.0, 0.0, 0.0), "ranks-at-the-end")


async def test_a_cancelled_search_stops_asking_for_pages():
    retriever = SlowPages()
    options = PipelineOptions(candidates=10, batch_size=2, mode="bm25")
    pipeline = TwoStagePipeline(retriever, RanksAtTheEnd(), options=options)  # type: ignore[arg-type]
    search = asyncio.create_task(pipeline.search(QUERY))
    await asyncio.to_thread(retriever.second_asked.wait)  # page 1 is being reranked, page 2 is on its way

    search.cancel()
    retriever.gate.set()  # the page being fetched may finish; no later one may be asked for
    with pytest.raises(asyncio.CancelledError):
        await search
    assert retriever.asked == 2
