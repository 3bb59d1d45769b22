"""Random requests: the server answers OK or INVALID_ARGUMENT, never crashes or hangs, and stays healthy."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rerank.v1 import rerank_pb2, rerank_pb2_grpc
from tests.conftest import RunningSidecar, wait_until

# Combining marks stacked on one letter, right-to-left text with its marks, and a megabyte.
UNUSUAL = (
    "e" + "\u0301\u0308\u0323" * 200,
    "\u202e\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627\u200f",
    "cats " * 200_000,
)
# Any Unicode, control characters and lone surrogates' neighbours included, short or long.
texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=0, max_size=3000),
    st.just(""),
    st.just("\x00\x01\x1b[31m\r\n\t"),
    st.sampled_from(UNUSUAL[:2]),
)
queries = st.one_of(texts, st.just(UNUSUAL[2]))
documents = st.one_of(
    st.lists(
        st.builds(rerank_pb2.Document, id=st.one_of(st.just(""), st.text(max_size=8)), text=texts),
        max_size=60,
    ),
    st.just([rerank_pb2.Document(text=UNUSUAL[2]), rerank_pb2.Document(text="cats")]),
)
options = st.fixed_dictionaries(
    {},
    optional={
        "top_n": st.integers(0, 2000),
        "raw_scores": st.booleans(),
        "max_length": st.integers(0, 1024),
        "truncation_direction": st.integers(0, 3),
        "long_documents": st.integers(0, 3),
        "max_chunks_per_doc": st.integers(0, 32),
        "chunk_overlap": st.integers(0, 600),
        "return_text": st.booleans(),
    },
)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def run(coroutine: Coroutine[Any, Any, tuple[grpc.StatusCode, str]]) -> None:
    """Run one example on the session's event loop (Hypothesis drives synchronous functions)."""
    code, details = asyncio.run_coroutine_threadsafe(coroutine, LOOP).result(timeout=60)
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, details)
    assert code == grpc.StatusCode.OK or details


LOOP: asyncio.AbstractEventLoop


async def test_random_rerank_requests(sidecar: RunningSidecar):
    global LOOP
    LOOP = asyncio.get_running_loop()

    async def outcome(request: rerank_pb2.RerankRequest) -> tuple[grpc.StatusCode, str]:
        try:
            response = await sidecar.stub.Rerank(request, timeout=30)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""
        assert len(response.results) <= len(request.documents)
        assert all(result.score == result.score for result in response.results)  # no NaN
        return grpc.StatusCode.OK, ""

    @FUZZ
    @given(query=queries, docs=documents, fields=options)
    def example(query: str, docs: list[rerank_pb2.Document], fields: dict) -> None:
        run(outcome(rerank_pb2.RerankRequest(query=query, documents=docs, **fields)))

    before = _calls(sidecar, "Rerank")
    await asyncio.get_running_loop().run_in_executor(None, example)
    assert _calls(sidecar, "Rerank") - before >= FUZZ.max_examples
    await _still_healthy(sidecar)


async def test_random_streams(sidecar: RunningSidecar):
    # The synchronous client: grpcio's asyncio client can report INTERNAL instead of the server's status
    # when the server ends a stream while the client is still writing (grpc/grpc#36066).
    channel = grpc.insecure_channel(f"127.0.0.1:{sidecar.server.port}")
    stub = rerank_pb2_grpc.RerankerStub(channel)

    @FUZZ
    @given(query=queries, pages=st.lists(documents, max_size=4), fields=options)
    def example(query: str, pages: list[list[rerank_pb2.Document]], fields: dict) -> None:
        first = rerank_pb2.RerankStreamRequest(query=query, **fields)
        messages = [first, *(rerank_pb2.RerankStreamRequest(documents=page) for page in pages)]
        code, details = _stream_outcome(stub, messages)
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, details)
        assert code == grpc.StatusCode.OK or details

    before = _calls(sidecar, "RerankStream")
    try:
        await asyncio.get_running_loop().run_in_executor(None, example)
    finally:
        channel.close()
    # The server counts a stream once its handler returns, which can be just after the client has read
    # the final message.
    await wait_until(lambda: _calls(sidecar, "RerankStream") - before >= FUZZ.max_examples)
    await _still_healthy(sidecar)


def _calls(sidecar: RunningSidecar, method: str) -> float:
    """Calls the server answered, by its own metrics: proof every example reached it."""
    counted = sidecar.server.core.metrics.requests.collect()[0].samples
    return sum(
        sample.value
        for sample in counted
        if sample.name == "rerank_requests_total"
        and sample.labels["method"] == f"/rerank.v1.Reranker/{method}"
        and sample.labels["code"] in ("OK", "INVALID_ARGUMENT")
    )


def _stream_outcome(
    stub: rerank_pb2_grpc.RerankerStub, messages: list[rerank_pb2.RerankStreamRequest]
) -> tuple[grpc.StatusCode, str]:
    try:
        replies = list(stub.RerankStream(iter(messages), timeout=30))
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    assert replies[-1].WhichOneof("kind") == "final"
    return grpc.StatusCode.OK, ""


async def _still_healthy(sidecar: RunningSidecar) -> None:
    status = await health_pb2_grpc.HealthStub(sidecar.channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert sidecar.server.core.reranker is not None
    # A stream refused part-way leaves its earlier pages queued until the batcher reaches them (and
    # drops or scores them): the queue must drain, not necessarily be empty the moment the client sees
    # the refusal.
    batcher = sidecar.server.core.reranker.batcher
    for _ in range(200):  # up to 10 s
        if not batcher.queued_pairs:
            break
        await asyncio.sleep(0.05)
    assert batcher.queued_pairs == 0
