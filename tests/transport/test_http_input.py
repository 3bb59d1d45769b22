"""Input no API defines well, on both transports: a lone UTF-16 surrogate in any text field of any route,
and bytes that are not UTF-8 over gRPC, are the caller's 400 (INVALID_ARGUMENT) naming the field, never a
500, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest

from client.local_sidecar import free_port
from rerank.v1 import rerank_pb2
from tests.conftest import RunningSidecar, docs, running_sidecar
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


async def post_raw(sidecar: RunningSidecar, path: str, content: bytes) -> httpx.Response:
    async with httpx.AsyncClient(base_url=sidecar.http_url) as client:
        return await client.post(path, content=content, headers={"content-type": "application/json"})


async def test_bodies_that_do_not_parse_say_why_in_the_routes_shape(http_sidecar: RunningSidecar):
    not_utf8 = await post_raw(http_sidecar, "/rerank", b'{"query": "q\xff", "texts": ["a"]}')
    nested = await post_raw(http_sidecar, "/v1/embeddings", b"[" * 100_000 + b"]" * 100_000)
    syntax = await post_raw(http_sidecar, "/v2/rerank", b'{"query": "q",, "documents": ["a"]}')
    assert not_utf8.status_code == 400
    assert not_utf8.json()["error_type"] == "Validation"
    assert "not valid UTF-8: byte 12 (0xff)" in not_utf8.json()["error"]
    assert nested.status_code == 400
    assert "nests too deeply" in nested.json()["error"]["message"]
    assert syntax.status_code == 400
    assert "at character 14" in syntax.json()["message"]


async def test_unknown_routes_and_methods_answer_in_the_routes_shape(http_sidecar: RunningSidecar):
    async with httpx.AsyncClient(base_url=http_sidecar.http_url) as client:
        missing = await client.post("/v3/rerank", json={})
        wrong_method = await client.get("/embed")
        openai_method = await client.get("/v1/embeddings")
    assert missing.status_code == 404
    assert "no route /v3/rerank" in missing.json()["message"]
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"] == "GET is not allowed on /embed; use POST"
    assert openai_method.json()["error"]["message"] == "GET is not allowed on /v1/embeddings; use POST"


@pytest.mark.parametrize(
    ("body", "param", "phrase"),
    [
        ({"input": ""}, "input", "input: String should have at least 1 character"),
        ({"input": ["a", ""]}, "input[1]", "input[1]: String should have at least 1 character"),
        ({"input": "a", "dimensions": 3}, "dimensions", "dimensions 3 is not supported"),
        ({"input": "a", "dimensions": True}, "dimensions", "must be an integer, not bool True"),
    ],
)
async def test_openai_errors_name_the_param(
    http_sidecar: RunningSidecar, body: dict, param: str, phrase: str
):
    async with httpx.AsyncClient(base_url=http_sidecar.http_url) as client:
        response = await client.post("/v1/embeddings", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert phrase in error["message"]


async def test_tei_truncate_false_refuses_what_truncate_true_cuts(http_sidecar: RunningSidecar):
    long_text = "cats eat meat " * 400
    async with httpx.AsyncClient(base_url=http_sidecar.http_url) as client:
        cut = await client.post("/rerank", json={"query": "q", "texts": [long_text], "truncate": True})
        refused = await client.post(
            "/rerank", json={"query": "q", "texts": ["a", long_text], "truncate": False}
        )
        short = await client.post("/rerank", json={"query": "q", "texts": ["a"], "truncate": False})
        embed_refused = await client.post("/embed", json={"inputs": long_text, "truncate": False})
        embed_cut = await client.post("/embed", json={"inputs": long_text})
    assert cut.status_code == 200
    assert short.status_code == 200
    for response in (refused, embed_refused):
        assert response.status_code == 400
        assert "truncation is off (truncate: false)" in response.json()["error"]
    assert embed_cut.status_code == 200


async def test_tei_reads_both_spellings_of_the_direction(http_sidecar: RunningSidecar):
    texts = ["cats eat meat " * 200 + "dogs", "the sea " * 300]
    scores = {}
    async with httpx.AsyncClient(base_url=http_sidecar.http_url) as client:
        for direction in ("Left", "left", "Right", "right"):
            body = {"query": "q", "texts": texts, "truncation_direction": direction, "raw_scores": True}
            response = await client.post("/rerank", json=body)
            assert response.status_code == 200, response.text
            scores[direction] = sorted((rank["index"], rank["score"]) for rank in response.json())
        embed = await client.post("/embed", json={"inputs": texts, "truncation_direction": "left"})
        unknown = await client.post("/embed", json={"inputs": "a", "prompt_name": "query"})
    assert scores["Left"] == scores["left"] != scores["Right"] == scores["right"]
    assert embed.status_code == 200
    assert unknown.status_code == 400
    assert "prompt_name: not supported here" in unknown.json()["error"]


async def test_cohere_v2_return_documents_and_v1_rank_fields(http_sidecar: RunningSidecar):
    documents = [
        {"text": "cats", "title": "Cats", "body": "Cats are obligate carnivores."},
        {"text": "soup", "title": "Soup", "body": "A recipe for vegetable soup."},
        {"text": "stocks", "title": "Stocks", "body": "The market fell on Tuesday."},
    ]
    texts = [f"title: {document['title']}\nbody: {document['body']}" for document in documents]
    async with httpx.AsyncClient(base_url=http_sidecar.http_url) as client:
        v2 = await client.post(
            "/v2/rerank", json={"query": "what do cats eat", "documents": texts, "return_documents": True}
        )
        v1 = await client.post(
            "/v1/rerank",
            json={
                "query": "what do cats eat",
                "documents": documents,
                "rank_fields": ["title", "body", "missing"],
                "return_documents": True,
            },
        )
        v2_fields = await client.post(
            "/v2/rerank",
            json={"query": "q", "documents": ["a"], "priority": 3, "relevant_spans": {"mode": "disabled"}},
        )
        spans = await client.post(
            "/v2/rerank", json={"query": "q", "documents": ["a"], "relevant_spans": {"mode": "enabled"}}
        )
        no_text = await client.post(
            "/v1/rerank", json={"query": "q", "documents": ["a", {"title": "b"}], "rank_fields": ["title"]}
        )
        chunked = await client.post(
            "/v1/rerank",
            json={"query": "q", "documents": ["cats eat meat " * 400], "max_chunks_per_doc": 3},
        )
        too_many_chunks = await client.post(
            "/v1/rerank", json={"query": "q", "documents": ["a"], "max_chunks_per_doc": 1000}
        )
    assert v2.status_code == 200
    by_v2 = {result["index"]: result for result in v2.json()["results"]}
    assert [by_v2[index]["document"]["text"] for index in range(3)] == texts
    # rank_fields ranks exactly the text v2 got: the fields in order, as "field: value" lines.
    assert v1.status_code == 200
    by_v1 = {result["index"]: result for result in v1.json()["results"]}
    assert [by_v1[index]["relevance_score"] for index in range(3)] == [
        by_v2[index]["relevance_score"] for index in range(3)
    ]
    assert len({result["relevance_score"] for result in v1.json()["results"]}) == 3
    assert [by_v1[index]["document"] for index in range(3)] == documents  # as sent, not as ranked
    assert v2_fields.status_code == 200
    assert spans.status_code == 400
    assert "relevant_spans.mode" in spans.json()["message"]
    assert no_text.status_code == 400  # Cohere: an object's text is required
    assert "documents[1].text: Field required" in no_text.json()["message"]
    assert chunked.status_code == 200
    assert chunked.json()["results"][0]["index"] == 0
    assert too_many_chunks.status_code == 400
    assert "max_chunks_per_doc 1000 is out of range" in too_many_chunks.json()["message"]


async def test_answers_and_metrics_name_the_model_not_its_path(http_sidecar: RunningSidecar):
    model_path = str(http_sidecar.server.settings.model)
    async with httpx.AsyncClient(base_url=http_sidecar.http_url) as client:
        answer = (await client.post("/v2/rerank", json={"query": "q", "documents": ["a"]})).json()
        v1 = (await client.post("/v1/rerank", json={"query": "q", "documents": ["a"]})).json()
    metrics = http_sidecar.server.core.metrics.registry
    labels = [sample.labels for family in metrics.collect() for sample in family.samples]
    assert answer["model"] == v1["model"] == Path(model_path).name
    assert all(model_path not in str(label) for label in labels)


async def test_megabyte_documents_are_read_only_as_far_as_the_pairs_use(http_sidecar: RunningSidecar):
    from tests.families.test_bounded_tokenization import SENTENCE, RecordingTokenizer

    tokenizer = http_sidecar.server.core.reranker.model.tokenizer  # type: ignore[union-attr]
    recording = RecordingTokenizer(tokenizer._tokenizer)
    tokenizer._tokenizer = recording  # type: ignore[assignment]
    megabyte = SENTENCE * ((1 << 20) // len(SENTENCE))
    prefix = megabyte[: 64 * 1024]  # far more than 512 tokens: the same pairs as the megabyte
    try:
        grpc_scores = [
            (
                await http_sidecar.stub.Rerank(
                    rerank_pb2.RerankRequest(query="what do cats eat", documents=docs(text), raw_scores=True),
                    timeout=60,
                )
            )
            .results[0]
            .score
            for text in (megabyte, prefix)
        ]
        async with httpx.AsyncClient(base_url=http_sidecar.http_url, timeout=60) as client:
            http_scores = [
                (
                    await client.post(
                        "/rerank", json={"query": "what do cats eat", "texts": [text], "raw_scores": True}
                    )
                ).json()[0]["score"]
                for text in (megabyte, prefix)
            ]
    finally:
        tokenizer._tokenizer = recording._inner
    assert grpc_scores[0] == grpc_scores[1] == http_scores[0] == http_scores[1]
    max_length = http_sidecar.server.core.reranker.model.max_length  # type: ignore[union-attr]
    assert recording.longest <= (max_length + 8) * 16


async def test_random_text_in_every_http_text_field_is_200_or_400(http_sidecar: RunningSidecar):
    """Hypothesis: any code point (lone surrogates, NULs included), combining marks, right-to-left text
    and a megabyte, in each text field of each route; never a 500, and the server keeps serving."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.transport.test_fuzz import UNUSUAL

    text = st.one_of(
        st.text(st.characters(codec=None, categories=None), max_size=60),
        st.sampled_from(["\x00", "\ud800", "a\udfffb", *UNUSUAL]),
    )
    routes = {
        "/v2/rerank": lambda query, texts: {"query": query, "documents": texts},
        "/v1/rerank": lambda query, texts: {"query": query, "documents": [{"text": t} for t in texts]},
        "/rerank": lambda query, texts: {"query": query, "texts": texts},
        "/embed": lambda query, texts: {"inputs": [query, *texts]},
        "/v1/embeddings": lambda query, texts: {"input": [query, *texts]},
    }
    statuses: list[int] = []

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(sorted(routes)), query=text, texts=st.lists(text, min_size=1, max_size=4))
    def example(route: str, query: str, texts: list[str]) -> None:
        body = json.dumps(routes[route](query, texts)).encode()  # ASCII: surrogates as \\u escapes
        with httpx.Client(base_url=http_sidecar.http_url, timeout=120) as client:
            response = client.post(route, content=body, headers={"content-type": "application/json"})
        assert response.status_code in (200, 400), (route, response.status_code, response.text[:500])
        statuses.append(response.status_code)

    await asyncio.get_running_loop().run_in_executor(None, example)
    assert len(statuses) >= 40
    assert {200, 400} <= set(statuses)
    async with httpx.AsyncClient(base_url=http_sidecar.http_url) as client:
        assert (await client.get("/health")).status_code == 200
