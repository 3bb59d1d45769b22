"""Bad input, overload, deadlines and cancellation: a clear status, and no harm to other callers."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import numpy as np
import pytest
from transformers import AutoTokenizer

from rerank.v1 import rerank_pb2
from tests.conftest import RunningSidecar, docs, running_sidecar, wait_until

GOOD = {"query": "a question", "documents": docs("first passage", "second passage")}


@pytest.mark.parametrize(
    ("fields", "phrase"),
    [
        ({"query": ""}, "query is empty"),
        ({"query": "   "}, "query is empty"),
        ({"query": "\u200b\x00\ufeff"}, "query has no tokens for this model's tokenizer"),
        ({"documents": []}, "documents is empty"),
        ({"documents": docs(*["x"] * 1001, ids=[""] * 1001)}, "limit per request (or stream) is 1000"),
        ({"top_n": 1001}, "top_n 1001 is out of range"),
        ({"max_length": 513}, "max_length 513 exceeds the model's limit of 512"),
        ({"max_length": 3}, "max_length 3 is too small"),
        ({"documents": docs("a", "b", ids=["x", "x"])}, "document id 'x' is repeated (documents 0 and 1)"),
        ({"truncation_direction": 7}, "truncation_direction has unknown value 7"),
        ({"long_documents": 9}, "long_documents has unknown value 9"),
        ({"max_chunks_per_doc": 2}, "apply only with long_documents=LONG_DOCUMENTS_CHUNK"),
        ({"chunk_overlap": 2}, "apply only with long_documents=LONG_DOCUMENTS_CHUNK"),
        (
            {"long_documents": rerank_pb2.LONG_DOCUMENTS_CHUNK, "max_chunks_per_doc": 17},
            "max_chunks_per_doc 17 is out of range",
        ),
        (
            {"long_documents": rerank_pb2.LONG_DOCUMENTS_CHUNK, "chunk_overlap": 600, "max_length": 64},
            "chunk_overlap 600 must be smaller than the chunk length",
        ),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    sidecar: RunningSidecar, fields: dict, phrase: str
):
    request = rerank_pb2.RerankRequest(**{**GOOD, **fields})
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await sidecar.stub.Rerank(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert phrase in raised.value.details()
    # The server stays healthy for everyone else.
    assert len((await sidecar.stub.Rerank(rerank_pb2.RerankRequest(**GOOD), timeout=30)).results) == 2


async def test_errors_carry_the_request_id(sidecar: RunningSidecar):
    call = sidecar.stub.Rerank(
        rerank_pb2.RerankRequest(query="", documents=docs("a")),
        timeout=30,
        metadata=(("x-request-id", "abc-123"),),
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert ("x-request-id", "abc-123") in tuple(raised.value.trailing_metadata() or ())


@pytest.fixture
async def small_queue(tiny_bert: Path):
    async with running_sidecar(tiny_bert, max_queued_pairs=8, max_batch_pairs=4) as running:
        yield running


async def test_overload_fails_at_once_with_resource_exhausted(small_queue: RunningSidecar, monkeypatch):
    engine = small_queue.engine
    scorer = small_queue.server.core.reranker.scorer  # type: ignore[union-attr]
    encoded: list[str] = []
    encode = scorer.encode

    async def counting_encode(query, documents, spec):
        encoded.append(query)
        return await encode(query, documents, spec)

    monkeypatch.setattr(scorer, "encode", counting_encode)
    engine.open.clear()
    engine.entered.clear()
    first = small_queue.stub.Rerank(
        rerank_pb2.RerankRequest(query="q", documents=docs(*[f"passage {i}" for i in range(8)])), timeout=60
    )
    try:
        await wait_until(engine.entered.is_set)  # 4 pairs in the model, 4 still queued
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await small_queue.stub.Rerank(
                rerank_pb2.RerankRequest(query="q", documents=docs(*[f"other {i}" for i in range(5)])),
                timeout=60,
            )
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at capacity" in raised.value.details()
        assert not first.done()  # refused while the model was still held: it did not wait for room
        assert len(encoded) == 1  # refused before tokenizing: overload costs the model no CPU
        with pytest.raises(grpc.aio.AioRpcError) as too_big:
            await small_queue.stub.Rerank(
                rerank_pb2.RerankRequest(query="q", documents=docs(*[f"big {i}" for i in range(9)])),
                timeout=60,
            )
        # No wait makes room for it: the caller's to change, not to retry.
        assert too_big.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "--max-queued-pairs" in too_big.value.details()
    finally:
        engine.open.set()
    assert len((await first).results) == 8


def marker_token(sidecar: RunningSidecar, word: str) -> int:
    """The id of a word that only one request uses, to find that request's pairs in the engine's batches."""
    tokenizer = AutoTokenizer.from_pretrained(sidecar.server.settings.model)
    (token,) = tokenizer(word, add_special_tokens=False)["input_ids"]
    return token


async def test_expired_deadline_never_reaches_the_model(small_queue: RunningSidecar):
    engine = small_queue.engine
    engine.open.clear()
    engine.entered.clear()
    blocker = small_queue.stub.Rerank(rerank_pb2.RerankRequest(query="q", documents=docs("hold")), timeout=60)
    try:
        await wait_until(engine.entered.is_set)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await small_queue.stub.Rerank(
                rerank_pb2.RerankRequest(query="elephant", documents=docs("giraffe")), timeout=0.3
            )
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        engine.open.set()
    await blocker
    await small_queue.stub.Rerank(rerank_pb2.RerankRequest(query="q", documents=docs("after")), timeout=30)
    assert not engine.saw_token(marker_token(small_queue, "elephant"))
    assert small_queue.server.core.reranker is not None
    assert small_queue.server.core.reranker.batcher.queued_pairs == 0


async def test_cancelled_call_never_reaches_the_model(small_queue: RunningSidecar):
    engine = small_queue.engine
    engine.open.clear()
    engine.entered.clear()
    blocker = small_queue.stub.Rerank(rerank_pb2.RerankRequest(query="q", documents=docs("hold")), timeout=60)
    try:
        await wait_until(engine.entered.is_set)
        doomed = small_queue.stub.Rerank(
            rerank_pb2.RerankRequest(query="elephant", documents=docs("giraffe")), timeout=60
        )
        batcher = small_queue.server.core.reranker.batcher  # type: ignore[union-attr]
        await wait_until(lambda: batcher.queued_pairs == 1)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
    finally:
        engine.open.set()
    await blocker
    await small_queue.stub.Rerank(rerank_pb2.RerankRequest(query="q", documents=docs("after")), timeout=30)
    assert not engine.saw_token(marker_token(small_queue, "elephant"))
    assert batcher.queued_pairs == 0


async def test_engine_failure_reaches_every_caller_and_the_server_recovers(small_queue: RunningSidecar):
    engine = small_queue.engine
    original = engine.inner.forward

    def broken(batch):
        raise RuntimeError("simulated device error")

    engine.inner.forward = broken  # type: ignore[method-assign]
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await small_queue.stub.Rerank(
                rerank_pb2.RerankRequest(query="q", documents=docs("a", "b")), timeout=30
            )
        assert raised.value.code() == grpc.StatusCode.INTERNAL
        assert "simulated device error" in raised.value.details()
    finally:
        engine.inner.forward = original  # type: ignore[method-assign]
    response = await small_queue.stub.Rerank(
        rerank_pb2.RerankRequest(query="q", documents=docs("a")), timeout=30
    )
    assert len(response.results) == 1


def sample(running: RunningSidecar, name: str, **labels: str) -> float:
    value = running.server.core.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def access_log_statuses(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.fields["status"] for record in caplog.records if record.name == "sidecar.access"]  # type: ignore[attr-defined]


async def test_a_passed_deadline_frees_the_queue_at_once_and_is_recorded_as_deadline_exceeded(
    small_queue: RunningSidecar, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="sidecar.access")
    engine = small_queue.engine
    batcher = small_queue.server.core.reranker.batcher  # type: ignore[union-attr]
    engine.open.clear()
    engine.entered.clear()
    blocker = small_queue.stub.Rerank(rerank_pb2.RerankRequest(query="q", documents=docs("hold")), timeout=60)
    try:
        await wait_until(engine.entered.is_set)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await small_queue.stub.Rerank(
                rerank_pb2.RerankRequest(query="elephant", documents=docs(*["giraffe"] * 6)), timeout=0.3
            )
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Freed while the model still holds the blocker's batch, not when the next batch is formed.
        await wait_until(lambda: batcher.queued_pairs == 0)
        assert not blocker.done()
        await wait_until(lambda: "DEADLINE_EXCEEDED" in access_log_statuses(caplog))
        assert "CANCELLED" not in access_log_statuses(caplog)
    finally:
        engine.open.set()
    await blocker
    method = "/rerank.v1.Reranker/Rerank"
    model = small_queue.server.core.ranking.name  # type: ignore[union-attr]
    assert (
        sample(small_queue, "rerank_requests_total", method=method, model=model, code="DEADLINE_EXCEEDED")
        == 1
    )
    assert sample(small_queue, "rerank_requests_total", method=method, model=model, code="CANCELLED") == 0


async def test_a_deadline_of_seconds_is_recorded_as_deadline_exceeded_not_cancelled(
    small_queue: RunningSidecar,
):
    # gRPC ends a long call a few milliseconds before the server's clock reaches its deadline.
    engine = small_queue.engine
    method = "/rerank.v1.Reranker/Rerank"
    model = small_queue.server.core.ranking.name  # type: ignore[union-attr]

    def counted(code: str) -> float:
        return sample(small_queue, "rerank_requests_total", method=method, model=model, code=code)

    before = {code: counted(code) for code in ("DEADLINE_EXCEEDED", "CANCELLED")}
    engine.open.clear()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await small_queue.stub.Rerank(
                rerank_pb2.RerankRequest(query="q", documents=docs("a")), timeout=1.5
            )
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_until(lambda: counted("DEADLINE_EXCEEDED") > before["DEADLINE_EXCEEDED"])
    finally:
        engine.open.set()
    assert counted("CANCELLED") == before["CANCELLED"]


async def test_a_cancelled_call_frees_the_queue_while_the_model_is_busy(small_queue: RunningSidecar):
    engine = small_queue.engine
    batcher = small_queue.server.core.reranker.batcher  # type: ignore[union-attr]
    engine.open.clear()
    engine.entered.clear()
    blocker = small_queue.stub.Rerank(rerank_pb2.RerankRequest(query="q", documents=docs("hold")), timeout=60)
    try:
        await wait_until(engine.entered.is_set)
        leaving = small_queue.stub.Rerank(
            rerank_pb2.RerankRequest(query="elephant", documents=docs(*["giraffe"] * 6)), timeout=60
        )
        await wait_until(lambda: batcher.queued_pairs == 6)
        leaving.cancel()
        await wait_until(lambda: batcher.queued_pairs == 0)
        assert not blocker.done()
        # The queue has room for a full request again while the model is still busy.
        after = small_queue.stub.Rerank(
            rerank_pb2.RerankRequest(query="q", documents=docs(*[f"p {i}" for i in range(7)])), timeout=60
        )
        await wait_until(lambda: batcher.queued_pairs == 7)
    finally:
        engine.open.set()
    await blocker
    assert len((await after).results) == 7


async def test_a_non_finite_score_is_an_internal_error_counted_and_logged(
    small_queue: RunningSidecar, caplog: pytest.LogCaptureFixture
):
    engine = small_queue.engine
    poison = marker_token(small_queue, "elephant")
    original = engine.inner.forward

    def nan_for_the_marker(batch):
        outputs = original(batch)
        outputs[(batch.input_ids == poison).any(axis=1)] = np.nan
        return outputs

    engine.inner.forward = nan_for_the_marker  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.ERROR, logger="sidecar.serving.core"):
            poisoned = small_queue.stub.Rerank(
                rerank_pb2.RerankRequest(query="q", documents=docs("a", "elephant")), timeout=30
            )
            healthy = small_queue.stub.Rerank(
                rerank_pb2.RerankRequest(query="q", documents=docs("b", "c")), timeout=30
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await poisoned
            assert len((await healthy).results) == 2
    finally:
        engine.inner.forward = original  # type: ignore[method-assign]
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "non-finite" in raised.value.details()
    model = Path(small_queue.server.settings.model).name  # a local model is reported by its name
    assert sample(small_queue, "rerank_non_finite_requests_total", model=model, engine="torch/fp32") == 1
    (logged,) = [record.getMessage() for record in caplog.records if "non-finite" in record.getMessage()]
    assert model in logged
    assert "torch/fp32" in logged
    # The engine stays in service (NonFiniteOutput says why): the next request is served.
    response = await small_queue.stub.Rerank(
        rerank_pb2.RerankRequest(query="q", documents=docs("a")), timeout=30
    )
    assert len(response.results) == 1
    assert small_queue.server.core.state.value == "serving"
