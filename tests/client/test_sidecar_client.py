"""The stub wrappers against the in-process sidecar (tiny cross-encoder, packaged MiniLM embedder)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest

from client.errors import DeadlineExceeded
from client.sidecar_client import (
    AsyncRerankClient,
    BatchScores,
    Ranking,
    RerankClient,
    RerankOptions,
    TlsConfig,
    channel_target,
    service_config,
)
from rerank.v1 import rerank_pb2
from tests.client.conftest import FAKE_DIMS, RunningEmbedder
from tests.conftest import RunningSidecar, running_sidecar

DOCUMENTS = [
    "Cats are obligate carnivores.",
    "The stock market fell.",
    "Kittens need protein.",
    "Rain today.",
]


def target(sidecar: RunningSidecar) -> str:
    return f"127.0.0.1:{sidecar.server.port}"


def test_address_lists_become_round_robin_targets():
    assert channel_target("127.0.0.1:5001, 127.0.0.1:5002") == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    assert channel_target("[::1]:5001,[::1]:5002") == "ipv6:[::1]:5001,[::1]:5002"
    assert channel_target("dns:///rerank.internal:50051") == "dns:///rerank.internal:50051"
    with pytest.raises(ValueError, match="dns"):
        channel_target("a.internal:1,b.internal:2")
    config = json.loads(service_config(max_attempts=3))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    policy = config["methodConfig"][0]["retryPolicy"]
    assert (policy["maxAttempts"], policy["retryableStatusCodes"]) == (3, ["UNAVAILABLE", "CANCELLED"])
    with pytest.raises(ValueError, match="key"):
        TlsConfig(client_cert=Path("cert.pem")).credentials()


async def test_blocking_client_reranks_streams_embeds_and_describes(embedding_sidecar: RunningSidecar):
    def calls() -> tuple[Ranking, list[BatchScores | Ranking], np.ndarray, rerank_pb2.InfoResponse]:
        with RerankClient(target(embedding_sidecar), timeout=30) as client:
            ranking = client.rerank("what do cats eat", DOCUMENTS, RerankOptions(top_n=2, return_text=True))
            batches = [DOCUMENTS[:2], [rerank_pb2.Document(id="k", text=DOCUMENTS[2])]]
            streamed = list(client.rerank_stream("what do cats eat", iter(batches)))
            return ranking, streamed, client.embed(DOCUMENTS).vectors, client.info()

    ranking, streamed, vectors, info = await asyncio.to_thread(calls)

    assert len(ranking.results) == 2
    assert ranking.results[0].score >= ranking.results[1].score
    assert ranking.results[0].text == DOCUMENTS[ranking.results[0].index]
    assert ranking.usage.pairs == 4
    assert [type(item) for item in streamed] == [BatchScores, BatchScores, Ranking]
    final = streamed[-1]
    assert isinstance(final, Ranking)
    assert sorted(r.index for r in final.results) == [0, 1, 2]
    assert {r.id for r in final.results} == {"", "k"}
    assert vectors.shape == (4, info.embedding_model.dims)
    assert np.linalg.norm(vectors, axis=1) == pytest.approx(1.0, abs=1e-4)
    assert info.model_id
    assert info.embedding_model.dims == 384


async def test_async_stream_takes_an_async_iterator_and_yields_scores_as_batches_finish(
    sidecar: RunningSidecar,
):
    async def batches() -> AsyncIterator[Sequence[str]]:
        for start in range(0, len(DOCUMENTS), 2):
            yield DOCUMENTS[start : start + 2]

    async with AsyncRerankClient(target(sidecar), timeout=30) as client:
        items = [item async for item in client.rerank_stream("cats", batches(), RerankOptions(top_n=3))]
        whole = await client.rerank("cats", DOCUMENTS)

    # Each batch is answered when scored, so the two may come back in either order.
    assert sorted(item.batch for item in items[:-1] if isinstance(item, BatchScores)) == [0, 1]
    final = items[-1]
    assert isinstance(final, Ranking)
    assert [r.index for r in final.results] == [r.index for r in whole.results][:3]
    assert [r.score for r in final.results] == pytest.approx([r.score for r in whole.results][:3], abs=1e-5)


async def test_every_call_has_a_deadline(sidecar: RunningSidecar):
    sidecar.engine.open.clear()  # hold the model: the call cannot finish in time
    try:
        async with AsyncRerankClient(target(sidecar), timeout=0.3) as client:
            with pytest.raises(DeadlineExceeded) as caught:
                await client.rerank("cats", DOCUMENTS)
    finally:
        sidecar.engine.open.set()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_unavailable_is_retried_by_the_service_config(fake_embedder: RunningEmbedder):
    fake_embedder.servicer.fail_next = 2
    calls_before = fake_embedder.servicer.calls
    async with AsyncRerankClient(fake_embedder.target, timeout=10, max_attempts=3) as client:
        embeddings = await client.embed(["cell membrane"])
    assert embeddings.dims == FAKE_DIMS
    assert fake_embedder.servicer.calls - calls_before == 3


async def test_an_asyncio_client_made_before_its_event_loop_runs_works_in_it(fake_embedder: RunningEmbedder):
    # As a web app makes it at import time; a grpc.aio channel serves the loop it was made in.
    client = await asyncio.to_thread(AsyncRerankClient, fake_embedder.target, timeout=10)
    async with client:
        assert (await client.embed(["cell membrane"])).dims == FAKE_DIMS
        with pytest.raises(RuntimeError, match="first used in another event loop"):
            await asyncio.to_thread(asyncio.run, client.embed(["cell membrane"]))
    with pytest.raises(RuntimeError, match="is closed; make a new one"):
        await client.embed(["cell membrane"])


async def test_round_robin_spreads_calls_over_every_sidecar(sidecar: RunningSidecar, tiny_bert: Path):
    async with running_sidecar(tiny_bert, embed_model="") as second:
        before = (len(sidecar.engine.batches), len(second.engine.batches))
        addresses = f"{target(sidecar)},{target(second)}"
        async with AsyncRerankClient(addresses, timeout=30) as client:
            for _ in range(6):
                await client.rerank("cats", DOCUMENTS[:1])
        after = (len(sidecar.engine.batches), len(second.engine.batches))
    assert after[0] > before[0]
    assert after[1] > before[1]


class BatchesBroke(Exception):
    """What the caller's batches raise."""


def batches_that_break() -> Iterator[Sequence[str]]:
    yield DOCUMENTS[:2]
    raise BatchesBroke("the third page could not be read")


async def test_an_exception_from_the_callers_batches_is_raised_by_the_blocking_client(
    sidecar: RunningSidecar,
):
    def stream() -> None:
        with RerankClient(target(sidecar), timeout=30) as client:
            list(client.rerank_stream("cats", batches_that_break()))

    with pytest.raises(BatchesBroke, match="third page"):  # not the sidecar's UNKNOWN
        await asyncio.to_thread(stream)


async def test_an_exception_from_the_callers_batches_is_raised_by_the_asyncio_client(sidecar: RunningSidecar):
    async def async_batches() -> AsyncIterator[Sequence[str]]:
        for batch in batches_that_break():
            yield batch

    async with AsyncRerankClient(target(sidecar), timeout=30) as client:
        for batches in (batches_that_break(), async_batches()):
            with pytest.raises(BatchesBroke, match="third page"):  # not a bare CancelledError
                [item async for item in client.rerank_stream("cats", batches)]
