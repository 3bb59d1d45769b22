"""Input no API defines well, on both transports: a lone UTF-16 surrogate in any text field of any route,
and bytes that are not UTF-8 over gRPC, are the caller's 400 (INVALID_ARGUMENT) naming the field, never a
500, and the server keeps serving."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest

from rerank.v1 import rerank_pb2
from tests.conftest import RunningSidecar, docs, free_port, running_sidecar
from tests.transport.test_embed import MINILM


@pytest.fixture(scope="module")
async def http_sidecar(tiny_bert: Path) -> AsyncIterator[RunningSidecar]:
    async with running_sidecar(tiny_bert, http_port=free_port(), embed_model=MINILM) as running:
        yield running


# Each text field of each route, with a lone surrogate escaped as JSON allows, and the field as sent.
SURROGATE = "\\ud800"
CASES = [
    ("/v2/rerank", f'{{"query": "q{SURROGATE}", "documents": ["a"]}}', "query"),
    ("/v2/rerank", f'{{"query": "q", "documents": ["a", "b{SURROGATE}"]}}', "documents[1]"),
    ("/v1/rerank", f'{{"query": "q{SURROGATE}", "documents": ["a"]}}', "query"),
    ("/v1/rerank", f'{{"query": "q", "documents": ["a", "{SURROGATE}"]}}', "documents[1]"),
    ("/v1/rerank", f'{{"query": "q", "documents": [{{"text": "{SURROGATE}"}}]}}', "documents[0].text"),
    ("/rerank", f'{{"query": "{SURROGATE}x", "texts": ["a"]}}', "query"),
    ("/rerank", f'{{"query": "q", "texts": ["a", "b", "{SURROGATE}"]}}', "texts[2]"),
    ("/embed", f'{{"inputs": "{SURROGATE}"}}', "inputs"),
    ("/embed", '{"inputs": ["a", "\\udfff"]}', "inputs[1]"),
    ("/v1/embeddings", f'{{"input": "{SURROGATE}"}}', "input"),
    ("/v1/embeddings", f'{{"input": ["{SURROGATE}"]}}', "input[0]"),
]


def message_of(path: str, body: dict) -> str:
    if path == "/v1/embeddings":
        return body["error"]["message"]
    if path in ("/rerank", "/embed"):
        return body["error"]
    return body["message"]


@pytest.mark.parametrize(("path", "body", "field"), CASES)
async def test_a_lone_surrogate_is_400_naming_the_field(
    http_sidecar: RunningSidecar, path: str, body: str, field: str
):
    async with httpx.AsyncClient(base_url=http_sidecar.http_url) as client:
        response = await client.post(path, content=body, headers={"content-type": "application/json"})
        after = await client.post("/rerank", json={"query": "q", "texts": ["a"]})
    assert response.status_code == 400, response.text
    message = message_of(path, response.json())
    assert f"{field}: character" in message
    assert "lone UTF-16 surrogate" in message
    assert after.status_code == 200


async def test_grpc_text_that_is_not_utf8_is_invalid_argument(http_sidecar: RunningSidecar):
    request = rerank_pb2.RerankRequest(query="qq", documents=docs("a")).SerializeToString()
    rerank = http_sidecar.channel.unary_unary("/rerank.v1.Reranker/Rerank")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await rerank(request.replace(b"qq", b"\xed\xa0"), timeout=30)  # a surrogate, as CESU-8 writes it
    stream = http_sidecar.channel.stream_stream("/rerank.v1.Reranker/RerankStream")
    first = rerank_pb2.RerankStreamRequest(query="q").SerializeToString()
    bad_page = rerank_pb2.RerankStreamRequest(documents=docs("zz")).SerializeToString()
    with pytest.raises(grpc.aio.AioRpcError) as refused_stream:
        async for _ in stream(iter([first, bad_page.replace(b"zz", b"\xff\xfe")]), timeout=30):
            pass
    for error in (refused.value, refused_stream.value):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "must be valid UTF-8" in (error.details() or "")
    response = await http_sidecar.stub.Rerank(rerank_pb2.RerankRequest(query="q", documents=docs("a")))
    assert len(response.results) == 1
