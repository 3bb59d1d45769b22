"""The score cache through the transports: gRPC's Usage.cached_pairs on Rerank and RerankStream, Info, the
HTTP routes' scores and /info, and the metrics."""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client.local_sidecar import free_port
from rerank.v1 import rerank_pb2
from tests.conftest import RunningSidecar, docs, running_sidecar

QUERY = "what do cats eat"
TEXTS = (
    "Cats are obligate carnivores and eat meat.",
    "The stock market fell sharply on Tuesday.",
    "Kittens need food rich in protein and fat.",
    "",
)


@pytest.fixture(scope="module")
async def cached_sidecar(tiny_bert: Path) -> AsyncIterator[RunningSidecar]:
    async with running_sidecar(
        tiny_bert, score_cache_size=100, http_port=free_port(), metrics_port=free_port()
    ) as running:
        yield running


def scores_by_index(results: list[rerank_pb2.Result]) -> list[float]:
    return [result.score for result in sorted(results, key=lambda result: result.index)]


@pytest.mark.parametrize("raw_scores", [False, True], ids=["normalized", "raw"])
async def test_grpc_rerank_reports_cached_pairs_and_answers_them_bit_for_bit(
    cached_sidecar: RunningSidecar, raw_scores: bool
):
    request = rerank_pb2.RerankRequest(
        query=f"{QUERY} ({raw_scores})", documents=docs(*TEXTS), raw_scores=raw_scores
    )
    computed = await cached_sidecar.stub.Rerank(request, timeout=30)
    batches_run = len(cached_sidecar.engine.batches)
    cached = await cached_sidecar.stub.Rerank(request, timeout=30)
    assert (computed.usage.pairs, computed.usage.cached_pairs, computed.usage.chunks) == (4, 0, 4)
    assert (cached.usage.pairs, cached.usage.cached_pairs, cached.usage.chunks, cached.usage.batches) == (
        4,
        4,
        0,
        0,
    )
    assert len(cached_sidecar.engine.batches) == batches_run
    assert scores_by_index(list(cached.results)) == scores_by_index(list(computed.results))


async def test_grpc_stream_reports_cached_pairs_and_answers_them_bit_for_bit(cached_sidecar: RunningSidecar):
    query = f"{QUERY} (stream)"
    unary = await cached_sidecar.stub.Rerank(
        rerank_pb2.RerankRequest(query=query, documents=docs(*TEXTS)), timeout=30
    )

    async def requests() -> AsyncIterator[rerank_pb2.RerankStreamRequest]:
        yield rerank_pb2.RerankStreamRequest(query=query, documents=docs(*TEXTS[:2]))
        yield rerank_pb2.RerankStreamRequest(documents=docs(*TEXTS[2:], ids=["doc-2", "doc-3"]))

    batches_run = len(cached_sidecar.engine.batches)
    replies = [reply async for reply in cached_sidecar.stub.RerankStream(requests(), timeout=30)]
    final = replies[-1].final
    assert (final.usage.pairs, final.usage.cached_pairs, final.usage.batches) == (4, 4, 0)
    assert len(cached_sidecar.engine.batches) == batches_run
    assert scores_by_index(list(final.results)) == scores_by_index(list(unary.results))


async def test_info_says_whether_the_cache_serves(cached_sidecar: RunningSidecar, tiny_bert: Path):
    info = await cached_sidecar.stub.Info(rerank_pb2.InfoRequest(), timeout=10)
    assert (info.score_cache.serves, info.score_cache.max_pairs, info.score_cache.why_not_serving) == (
        True,
        100,
        "",
    )
    async with httpx.AsyncClient(base_url=cached_sidecar.http_url) as client:
        http_info = (await client.get("/info", timeout=10)).json()
    assert http_info["ranking"]["score_cache"]["serves"] is True
    async with running_sidecar(tiny_bert, score_cache_size=0) as uncached:
        off = await uncached.stub.Info(rerank_pb2.InfoRequest(), timeout=10)
    assert not off.score_cache.serves
    assert "--score-cache-size is 0" in off.score_cache.why_not_serving


async def test_http_routes_share_the_cache_with_grpc(cached_sidecar: RunningSidecar):
    query = f"{QUERY} (http)"
    computed = await cached_sidecar.stub.Rerank(
        rerank_pb2.RerankRequest(query=query, documents=docs(*TEXTS), raw_scores=True), timeout=30
    )
    batches_run = len(cached_sidecar.engine.batches)
    async with httpx.AsyncClient(base_url=cached_sidecar.http_url) as client:
        tei = await client.post("/rerank", json={"query": query, "texts": list(TEXTS), "raw_scores": True})
        cohere_body = {"model": "", "query": query, "documents": list(TEXTS)}
        cohere = await client.post("/v2/rerank", json=cohere_body)
    assert (tei.status_code, cohere.status_code) == (200, 200)
    assert len(cached_sidecar.engine.batches) == batches_run
    tei_scores = [rank["score"] for rank in sorted(tei.json(), key=lambda rank: rank["index"])]
    assert tei_scores == scores_by_index(list(computed.results))
    assert cohere.json()["meta"]["billed_units"]["search_units"] == 1  # cached documents count the same


async def test_metrics_export_hits_misses_and_size(cached_sidecar: RunningSidecar, tiny_bert: Path):
    request = rerank_pb2.RerankRequest(query=f"{QUERY} (metrics)", documents=docs(*TEXTS))

    def samples() -> dict[str, float]:
        url = f"http://127.0.0.1:{cached_sidecar.server.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
            if sample.name.startswith("rerank_score_cache_") and sample.labels == {"model": tiny_bert.name}
        }

    before = samples()
    await cached_sidecar.stub.Rerank(request, timeout=30)
    await cached_sidecar.stub.Rerank(request, timeout=30)
    after = samples()
    assert after["rerank_score_cache_misses_total"] - before["rerank_score_cache_misses_total"] == 4
    assert after["rerank_score_cache_hits_total"] - before["rerank_score_cache_hits_total"] == 4
    assert after["rerank_score_cache_pairs"] - before["rerank_score_cache_pairs"] == 4
