"""RerankStream: batches scored as they arrive, a final merged ranking, and stream-specific errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from rerank.v1 import rerank_pb2
from tests.conftest import ReferenceScorer, RunningSidecar, docs

QUERY = "how do vaccines train the immune system"
PAGES = (
    ("Vaccines expose the immune system to an antigen.", "Bread rises because of yeast."),
    ("Antibodies are produced by B cells after exposure.",),
    ("The river flooded the valley.", "Memory T cells persist for years.", "Paint dries faster in the sun."),
)


def page_docs(page: int) -> list[rerank_pb2.Document]:
    offset = sum(len(p) for p in PAGES[:page])
    return docs(*PAGES[page], ids=[f"p{page}-{i}" for i in range(offset, offset + len(PAGES[page]))])


async def test_each_batch_is_answered_before_the_stream_closes(
    sidecar: RunningSidecar, reference: ReferenceScorer
):
    outgoing: asyncio.Queue[rerank_pb2.RerankStreamRequest | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[rerank_pb2.RerankStreamRequest]:
        while (message := await outgoing.get()) is not None:
            yield message

    call = sidecar.stub.RerankStream(requests(), timeout=60)
    outgoing.put_nowait(rerank_pb2.RerankStreamRequest(query=QUERY, documents=page_docs(0), top_n=4))
    replies = []
    for page in range(1, len(PAGES) + 1):
        # The previous page's scores must arrive while the stream is still open.
        reply = await asyncio.wait_for(call.read(), timeout=30)
        assert reply.WhichOneof("kind") == "batch_scores"
        replies.append(reply.batch_scores)
        if page < len(PAGES):
            outgoing.put_nowait(rerank_pb2.RerankStreamRequest(documents=page_docs(page)))
    outgoing.put_nowait(None)
    final = await call.read()
    assert final.WhichOneof("kind") == "final"
    assert await call.read() == grpc.aio.EOF

    all_texts = [text for page in PAGES for text in page]
    expected = reference.scores(QUERY, all_texts)
    for number, batch in enumerate(replies):
        assert batch.batch == number
        offset = sum(len(p) for p in PAGES[:number])
        assert [r.index for r in batch.results] == list(range(offset, offset + len(PAGES[number])))
        assert [r.id for r in batch.results] == [d.id for d in page_docs(number)]
        np.testing.assert_allclose(
            [r.score for r in batch.results], expected[offset : offset + len(PAGES[number])], atol=1e-5
        )

    best = np.argsort(-expected, kind="stable")[:4]
    assert [r.index for r in final.final.results] == best.tolist()
    assert final.final.usage.pairs == len(all_texts)
    assert final.final.usage.batches >= len(PAGES)
    assert final.final.model_id == Path(sidecar.server.settings.model).name


async def test_stream_matches_unary_rerank(sidecar: RunningSidecar):
    texts = [text for page in PAGES for text in page]

    async def requests() -> AsyncIterator[rerank_pb2.RerankStreamRequest]:
        yield rerank_pb2.RerankStreamRequest(query=QUERY, return_text=True)  # options only, no documents
        for page in range(len(PAGES)):
            yield rerank_pb2.RerankStreamRequest(documents=page_docs(page))

    replies = [reply async for reply in sidecar.stub.RerankStream(requests(), timeout=60)]
    # Each batch is answered when its scores are ready, which need not be the order sent.
    assert sorted(reply.batch_scores.batch for reply in replies[:-1]) == [1, 2, 3]
    unary = await sidecar.stub.Rerank(
        rerank_pb2.RerankRequest(query=QUERY, documents=docs(*texts), return_text=True), timeout=30
    )
    final = replies[-1].final
    assert [(r.index, r.text) for r in final.results] == [(r.index, r.text) for r in unary.results]
    np.testing.assert_allclose([r.score for r in final.results], [r.score for r in unary.results], atol=1e-6)


async def stream_error(
    sidecar: RunningSidecar, *messages: rerank_pb2.RerankStreamRequest
) -> grpc.aio.AioRpcError:
    async def requests() -> AsyncIterator[rerank_pb2.RerankStreamRequest]:
        for message in messages:
            yield message

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in sidecar.stub.RerankStream(requests(), timeout=30):
            pass
    return raised.value


async def test_first_message_without_query_is_rejected(sidecar: RunningSidecar):
    error = await stream_error(sidecar, rerank_pb2.RerankStreamRequest(documents=docs("a")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "query" in error.details()


async def test_empty_stream_is_rejected(sidecar: RunningSidecar):
    error = await stream_error(sidecar)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message" in error.details()


async def test_stream_without_documents_is_rejected(sidecar: RunningSidecar):
    error = await stream_error(sidecar, rerank_pb2.RerankStreamRequest(query=QUERY))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no documents" in error.details()


async def test_options_after_the_first_message_are_rejected(sidecar: RunningSidecar):
    error = await stream_error(
        sidecar,
        rerank_pb2.RerankStreamRequest(query=QUERY, documents=docs("a")),
        rerank_pb2.RerankStreamRequest(documents=docs("b", ids=["b"]), top_n=3),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_n" in error.details()


async def test_ids_must_be_unique_across_the_stream(sidecar: RunningSidecar):
    error = await stream_error(
        sidecar,
        rerank_pb2.RerankStreamRequest(query=QUERY, documents=docs("a", ids=["same"])),
        rerank_pb2.RerankStreamRequest(documents=docs("b", ids=["same"])),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'same' is repeated" in error.details()


async def test_document_limit_counts_the_whole_stream(sidecar: RunningSidecar):
    limit = sidecar.server.settings.max_documents_per_request
    half = limit // 2 + 1
    error = await stream_error(
        sidecar,
        rerank_pb2.RerankStreamRequest(query=QUERY, documents=docs(*["x"] * half, ids=[""] * half)),
        rerank_pb2.RerankStreamRequest(documents=docs(*["y"] * half, ids=[""] * half)),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(limit) in error.details()
