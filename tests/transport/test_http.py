"""The HTTP/JSON transport: the official Cohere and OpenAI SDKs and plain httpx against the same models and
queue as gRPC, and every error status."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import cohere
import httpx
import numpy as np
import openai
import pytest

from client.local_sidecar import free_port
from rerank.v1 import rerank_pb2, rerank_pb2_grpc
from sidecar.serving.core import ServingState
from tests.conftest import RunningSidecar, docs, running_sidecar, wait_until
from tests.pki import Pki
from tests.transport.test_embed import MINILM, TEXTS
from tests.transport.test_errors import marker_token

QUERY = "what is the capital of France?"
DOCUMENTS = [
    "Bananas are yellow and rich in potassium.",
    "Paris is the capital and largest city of France.",
    "The Eiffel Tower stands in Paris.",
    "Berlin is the capital of Germany.",
]


@pytest.fixture(scope="module")
async def http_sidecar(tiny_bert: Path) -> AsyncIterator[RunningSidecar]:
    async with running_sidecar(
        tiny_bert, http_port=free_port(), http_metrics=True, embed_model=MINILM
    ) as running:
        yield running


@pytest.fixture(scope="module")
async def small_http_sidecar(tiny_bert: Path) -> AsyncIterator[RunningSidecar]:
    limits = {"max_queued_pairs": 8, "max_batch_pairs": 4, "max_message_bytes": 4096}
    async with running_sidecar(tiny_bert, http_port=free_port(), **limits) as running:  # type: ignore[arg-type]
        yield running


async def grpc_rerank(sidecar: RunningSidecar, **fields: object) -> rerank_pb2.RerankResponse:
    request = rerank_pb2.RerankRequest(query=QUERY, documents=docs(*DOCUMENTS), **fields)  # type: ignore[arg-type]
    return await sidecar.stub.Rerank(request, timeout=30)


async def test_cohere_sdk_v2_gets_the_order_and_scores_of_grpc(http_sidecar: RunningSidecar):
    expected = await grpc_rerank(http_sidecar)
    client = cohere.AsyncClientV2(api_key="unused", base_url=http_sidecar.http_url)
    served = http_sidecar.server.core.ranking.name  # type: ignore[union-attr]
    response = await client.rerank(model=served, query=QUERY, documents=DOCUMENTS, top_n=3)
    assert [result.index for result in response.results] == [result.index for result in expected.results][:3]
    scores = np.array([result.relevance_score for result in response.results], dtype=np.float32)
    np.testing.assert_array_equal(scores, [result.score for result in expected.results][:3])
    assert response.meta.billed_units.search_units == 1
    assert response.meta.api_version.version == "2"
    assert response.id


async def test_cohere_sdk_v1_takes_document_objects_and_returns_documents(http_sidecar: RunningSidecar):
    expected = await grpc_rerank(http_sidecar)
    client = cohere.AsyncClient(api_key="unused", base_url=http_sidecar.http_url)
    response = await client.rerank(
        query=QUERY, documents=[{"text": text} for text in DOCUMENTS], return_documents=True
    )
    assert [result.index for result in response.results] == [result.index for result in expected.results]
    assert [result.document.text for result in response.results] == [
        DOCUMENTS[result.index] for result in expected.results
    ]
    plain = await client.rerank(query=QUERY, documents=DOCUMENTS)
    assert all(result.document is None for result in plain.results)


async def test_openai_sdk_gets_the_vectors_of_grpc_embed(http_sidecar: RunningSidecar):
    texts = TEXTS[:3]
    stub = rerank_pb2_grpc.EmbedderStub(http_sidecar.channel)
    expected = await stub.Embed(rerank_pb2.EmbedRequest(texts=texts), timeout=30)
    expected_vectors = np.array([embedding.values for embedding in expected.embeddings], dtype=np.float32)
    client = openai.AsyncOpenAI(api_key="unused", base_url=f"{http_sidecar.http_url}/v1")
    # Unless told otherwise, the SDK asks for base64 and decodes it itself.
    for format_option in ({}, {"encoding_format": "float"}):
        response = await client.embeddings.create(model=MINILM, input=texts, **format_option)  # type: ignore[call-overload]
        vectors = np.array([item.embedding for item in response.data], dtype=np.float32)
        np.testing.assert_array_equal(vectors, expected_vectors)
        assert [item.index for item in response.data] == [0, 1, 2]
        assert response.model == MINILM
        assert response.usage.prompt_tokens == expected.usage.tokens


async def test_tei_rerank_matches_grpc_raw_scores_text_and_left_truncation(http_sidecar: RunningSidecar):
    long_documents = [text * 40 for text in DOCUMENTS]
    expected = await http_sidecar.stub.Rerank(
        rerank_pb2.RerankRequest(
            query=QUERY,
            documents=docs(*long_documents),
            raw_scores=True,
            truncation_direction=rerank_pb2.TRUNCATION_DIRECTION_LEFT,
        ),
        timeout=30,
    )
    async with httpx.AsyncClient(base_url=http_sidecar.http_url) as client:
        response = await client.post(
            "/rerank",
            json={
                "query": QUERY,
                "texts": long_documents,
                "raw_scores": True,
                "return_text": True,
                "truncate": True,
                "truncation_direction": "Left",
            },
        )
        assert response.status_code == 200
        ranks = response.json()
        assert [rank["index"] for rank in ranks] == [result.index for result in expected.results]
        np.testing.assert_array_equal(
            np.array([rank["score"] for rank in ranks], dtype=np.float32),
            [result.score for result in expected.results],
        )
        assert [rank["text"] for rank in ranks] == [long_documents[rank["index"]] for rank in ranks]
        plain = (await client.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS})).json()
        assert all(set(rank) == {"index", "score"} and 0 <= rank["score"] <= 1 for rank in plain)


async def test_tei_embed_takes_one_or_many_inputs_and_normalizes(http_sidecar: RunningSidecar):
    stub = rerank_pb2_grpc.EmbedderStub(http_sidecar.channel)
    expected = await stub.Embed(rerank_pb2.EmbedRequest(texts=TEXTS[:2]), timeout=30)
    async with httpx.AsyncClient(base_url=http_sidecar.http_url) as client:
        many = (await client.post("/embed", json={"inputs": TEXTS[:2]})).json()
        one = (await client.post("/embed", json={"inputs": TEXTS[0]})).json()
        # The model normalizes in its own Normalize module: its unnormalized pooling is not to be had.
        unnormalized = await client.post("/embed", json={"inputs": TEXTS[0], "normalize": False})
    np.testing.assert_allclose(many, [embedding.values for embedding in expected.embeddings], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(many, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(np.array(one, dtype=np.float32), [expected.embeddings[0].values])
    assert unnormalized.status_code == 400
    assert "normalize: false is not available" in unnormalized.json()["error"]


async def test_health_info_metrics_and_openapi(http_sidecar: RunningSidecar):
    async with httpx.AsyncClient(base_url=http_sidecar.http_url) as client:
        assert (await client.get("/health")).json() == {"status": "serving"}
        assert (await client.head("/health")).status_code == 200
        info = (await client.get("/info")).json()
        assert info["ranking"]["model_id"] == Path(http_sidecar.server.settings.model).name
        assert info["embedding"]["dims"] == 384
        await client.post("/v2/rerank", json={"model": "", "query": QUERY, "documents": DOCUMENTS})
        metrics = (await client.get("/metrics")).text
        model = Path(http_sidecar.server.settings.model).name
        assert f'rerank_requests_total{{code="200",method="http:/v2/rerank",model="{model}"}}' in metrics
        assert (
            f'rerank_stage_seconds_count{{method="http:/v2/rerank",model="{model}",stage="queue"}}' in metrics
        )
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert {"/v1/rerank", "/v2/rerank", "/rerank", "/embed", "/v1/embeddings"} <= set(paths)
        assert (await client.get("/docs")).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "phrase"),
    [
        (
            "/v2/rerank",
            {"model": "", "query": "q", "documents": []},
            "documents: List should have at least 1",
        ),
        (
            "/v2/rerank",
            {"model": "", "query": "q", "documents": ["a"], "top_n": 0},
            "top_n: Input should be",
        ),
        ("/v2/rerank", {"model": "", "query": " ", "documents": ["a"]}, "query is empty"),
        (
            "/v2/rerank",
            {"query": "q", "documents": ["a"], "top_n": True},
            "top_n: must be an integer, not bool",
        ),
        (
            "/rerank",
            {"query": "q", "texts": ["a"], "truncate": 0},
            "truncate: Input should be a valid boolean",
        ),
        ("/v2/rerank", {"model": "", "query": "q", "documents": ["a"] * 1001}, "limit per request"),
        (
            "/v2/rerank",
            {"model": "", "query": "q", "documents": [{"text": "a"}]},
            "documents[0]: Input should",
        ),
        ("/v1/rerank", {"query": "q"}, "documents: Field required"),
        ("/v1/embeddings", {"model": "", "input": [[1, 2]]}, "input"),
        ("/v1/embeddings", {"model": "", "input": "a", "dimensions": 3}, "dimensions 3 is not supported"),
    ],
)
async def test_bad_input_is_400_naming_the_field(
    http_sidecar: RunningSidecar, path: str, body: dict, phrase: str
):
    async with httpx.AsyncClient(base_url=http_sidecar.http_url) as client:
        response = await client.post(path, json=body)
    assert response.status_code == 400
    error = response.json()
    message = {"/v1/embeddings": lambda: error["error"]["message"], "/rerank": lambda: error["error"]}.get(
        path, lambda: error["message"]
    )()
    assert phrase in message
    assert response.headers["x-request-id"]


async def test_errors_come_in_each_apis_shape(http_sidecar: RunningSidecar):
    async with httpx.AsyncClient(base_url=http_sidecar.http_url) as client:
        tei = await client.post("/rerank", json={"query": "q", "texts": []})
        not_json = await client.post(
            "/v2/rerank",
            content=b"{not json",
            headers={"x-request-id": "abc-1", "content-type": "application/json"},
        )
        openai_error = await client.post("/v1/embeddings", json={"input": []})
        utf8_id = await client.post(
            "/rerank", json={"query": "q", "texts": ["a"]}, headers={"x-request-id": "été-1".encode()}
        )
        timeout = await client.post("/embed", json={"inputs": "a"}, headers={"x-request-timeout": "soon"})
    assert tei.status_code == 400
    assert tei.json()["error_type"] == "Validation"
    assert "texts: List should have at least 1" in tei.json()["error"]
    assert not_json.status_code == 400
    assert "the body is not valid JSON" in not_json.json()["message"]
    assert not_json.headers["x-request-id"] == "abc-1"
    assert utf8_id.headers.raw[-1] == (b"x-request-id", "été-1".encode())  # echoed byte for byte
    assert openai_error.json()["error"]["type"] == "invalid_request_error"
    assert "input: List should have at least 1 item" in openai_error.json()["error"]["message"]
    assert openai_error.json()["error"]["param"] == "input"
    assert timeout.status_code == 400
    assert "X-Request-Timeout 'soon' is not a positive number" in timeout.json()["error"]


async def test_body_over_the_limit_is_413(small_http_sidecar: RunningSidecar):
    async with httpx.AsyncClient(base_url=small_http_sidecar.http_url) as client:
        response = await client.post(
            "/v2/rerank", json={"model": "", "query": "q", "documents": ["a" * 5000]}
        )

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"query": "q", "texts": ["'
            for _ in range(10):
                yield b"a" * 1000
            yield b'"]}'

        chunked = await client.post("/rerank", content=chunks())
    assert response.status_code == 413
    assert "over the limit of 4096 (--max-message-bytes)" in response.json()["message"]
    assert chunked.status_code == 413
    assert chunked.json()["error_type"] == "Validation"


async def test_a_full_queue_is_429_with_retry_after_for_grpc_and_http_alike(
    small_http_sidecar: RunningSidecar,
):
    engine = small_http_sidecar.engine
    engine.open.clear()
    engine.entered.clear()
    # A gRPC caller fills the one queue that both transports share.
    first = small_http_sidecar.stub.Rerank(
        rerank_pb2.RerankRequest(query="q", documents=docs(*[f"passage {i}" for i in range(8)])), timeout=60
    )
    try:
        await wait_until(engine.entered.is_set)
        async with httpx.AsyncClient(base_url=small_http_sidecar.http_url) as client:
            response = await client.post(
                "/rerank", json={"query": "q", "texts": [f"other {i}" for i in range(5)]}
            )
        assert response.status_code == 429
        assert response.headers["retry-after"] == "1"
        assert response.json()["error_type"] == "Overloaded"
        assert "at capacity" in response.json()["error"]
    finally:
        engine.open.set()
    assert len((await first).results) == 8


@asynccontextmanager
async def engine_held(sidecar: RunningSidecar) -> AsyncIterator[None]:
    """Hold the model on one pair while the body runs; then check no "elephant" pair ever reached it
    and the queue emptied."""
    engine = sidecar.engine
    engine.open.clear()
    engine.entered.clear()
    blocker = sidecar.stub.Rerank(rerank_pb2.RerankRequest(query="q", documents=docs("hold")), timeout=60)
    try:
        await wait_until(engine.entered.is_set)
        yield
    finally:
        engine.open.set()
    await blocker
    await sidecar.stub.Rerank(rerank_pb2.RerankRequest(query="q", documents=docs("after")), timeout=30)
    assert not engine.saw_token(marker_token(sidecar, "elephant"))
    assert sidecar.server.core.reranker.batcher.queued_pairs == 0  # type: ignore[union-attr]


ELEPHANT = {"model": "", "query": "elephant", "documents": ["giraffe"]}


async def test_past_the_request_timeout_is_504_and_never_reaches_the_model(
    small_http_sidecar: RunningSidecar,
):
    async with (
        engine_held(small_http_sidecar),
        httpx.AsyncClient(base_url=small_http_sidecar.http_url) as client,
    ):
        response = await client.post("/v2/rerank", json=ELEPHANT, headers={"X-Request-Timeout": "0.3"})
    assert response.status_code == 504
    assert "X-Request-Timeout" in response.json()["message"]


async def test_a_client_that_disconnects_drops_its_queued_work(small_http_sidecar: RunningSidecar):
    batcher = small_http_sidecar.server.core.reranker.batcher  # type: ignore[union-attr]
    http = small_http_sidecar.server.http
    assert http is not None
    async with (
        engine_held(small_http_sidecar),
        httpx.AsyncClient(base_url=small_http_sidecar.http_url) as client,
    ):
        doomed = asyncio.create_task(client.post("/v2/rerank", json=ELEPHANT))
        await wait_until(lambda: batcher.queued_pairs == 1)
        doomed.cancel()  # httpx closes the connection
        with pytest.raises(asyncio.CancelledError):
            await doomed
        await wait_until(lambda: http.calls.in_flight == 0)


async def test_503_while_loading_and_while_draining(tiny_bert: Path):
    request = {"query": "q", "texts": ["a"]}
    async with running_sidecar(tiny_bert, load=False, http_port=free_port()) as running:
        client = httpx.AsyncClient(base_url=running.http_url)
        async with client:
            assert (await client.get("/health")).status_code == 503
            loading = await client.post("/rerank", json=request)
            assert loading.status_code == 503
            assert loading.json()["error_type"] == "Unhealthy"
            assert (await client.get("/info")).status_code == 503
            await running.server.load()
            assert (await client.get("/health")).status_code == 200
            assert (await client.post("/rerank", json=request)).status_code == 200
            running.server.core.begin_draining()
            assert (await client.get("/health")).json() == {"status": "draining"}
            draining = await client.post("/rerank", json=request)
            assert draining.status_code == 503
            assert "shutting down" in draining.json()["error"]


async def test_bearer_token_is_required_but_health_stays_open(tiny_bert: Path):
    async with running_sidecar(tiny_bert, http_port=free_port(), auth_token="s3cret") as running:
        body = {"model": "", "query": "q", "documents": ["a"]}
        async with httpx.AsyncClient(base_url=running.http_url) as client:
            missing = await client.post("/v2/rerank", json=body)
            wrong = await client.post("/v2/rerank", json=body, headers={"Authorization": "Bearer guess"})
            right = await client.post("/v2/rerank", json=body, headers={"Authorization": "Bearer s3cret"})
            # The scheme is case-insensitive (RFC 7235); the token is not.
            cases = [
                await client.post("/v2/rerank", json=body, headers={"Authorization": f"{scheme} s3cret"})
                for scheme in ("bearer", "BEARER", "BeArEr")
            ]
            wrong_case = await client.post(
                "/v2/rerank", json=body, headers={"Authorization": "Bearer S3CRET"}
            )
            basic = await client.post("/v2/rerank", json=body, headers={"Authorization": "Basic s3cret"})
            bare = await client.post("/v2/rerank", json=body, headers={"Authorization": "s3cret"})
            health = await client.get("/health")
        assert [response.status_code for response in cases] == [200, 200, 200]
        assert wrong_case.status_code == 401
        assert "uses the scheme 'Basic', not Bearer" in basic.json()["message"]
        assert bare.status_code == 401
        assert "uses no known scheme, not Bearer" in bare.json()["message"]
        assert "s3cret" not in bare.text  # a token sent bare never comes back
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert "missing bearer token" in missing.json()["message"]
        assert wrong.status_code == 401
        assert "not valid" in wrong.json()["message"]
        assert right.status_code == 200
        assert health.status_code == 200
        client = cohere.AsyncClientV2(api_key="s3cret", base_url=running.http_url)
        response = await client.rerank(model="", query="q", documents=["a", "b"])
        assert len(response.results) == 2


async def test_tls_and_mutual_tls_use_the_grpc_settings(tiny_bert: Path, tmp_path: Path):
    pki = Pki(tmp_path)
    verify = ssl.create_default_context(cafile=pki.file("ca.pem"))
    mtls = {
        "tls_cert_file": pki.file("server.pem"),
        "tls_key_file": pki.file("server-key.pem"),
        "tls_client_ca_file": pki.file("ca.pem"),
    }
    async with running_sidecar(tiny_bert, host="localhost", http_port=free_port(), **mtls) as running:
        url = f"https://localhost:{running.server.http.port}"  # type: ignore[union-attr]
        body = {"query": "q", "texts": ["a"]}
        with_certificate = ssl.create_default_context(cafile=pki.file("ca.pem"))
        with_certificate.load_cert_chain(pki.file("client.pem"), pki.file("client-key.pem"))
        async with httpx.AsyncClient(base_url=url, verify=with_certificate) as client:
            assert (await client.post("/rerank", json=body)).status_code == 200
        async with httpx.AsyncClient(base_url=url, verify=verify) as client:
            with pytest.raises(httpx.HTTPError):
                await client.post("/rerank", json=body)
        async with httpx.AsyncClient(base_url=url.replace("https", "http")) as client:
            with pytest.raises(httpx.HTTPError):
                await client.post("/rerank", json=body)


async def test_a_stop_lets_http_calls_in_flight_finish(tiny_bert: Path):
    async with running_sidecar(tiny_bert, http_port=free_port()) as running:
        engine = running.engine
        engine.open.clear()
        engine.entered.clear()
        async with httpx.AsyncClient(base_url=running.http_url) as client:
            in_flight = asyncio.create_task(client.post("/rerank", json={"query": "q", "texts": ["a", "b"]}))
            await wait_until(engine.entered.is_set)
            stopping = asyncio.create_task(running.server.stop(grace=30))
            await wait_until(lambda: running.server.core.state is ServingState.DRAINING)
            assert (await client.get("/health")).status_code == 503
            engine.open.set()
            response = await in_flight
            await stopping
        assert response.status_code == 200
        assert len(response.json()) == 2


class _OnMessage(logging.Handler):
    """Calls ``then`` when a record's message contains ``text``."""

    def __init__(self, text: str, then: Callable[[], None]) -> None:
        super().__init__()
        self._text, self._then = text, then

    def emit(self, record: logging.LogRecord) -> None:
        if self._text in record.getMessage():
            self._then()


async def test_a_call_still_running_when_the_grace_passes_is_a_503_and_its_work_is_dropped(
    tiny_bert: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    async with running_sidecar(tiny_bert, http_port=free_port()) as running:
        engine = running.engine
        engine.open.clear()
        engine.entered.clear()
        try:
            async with httpx.AsyncClient(base_url=running.http_url) as client:
                texts = [f"passage {index}" for index in range(40)]  # more than one batch: some stay queued
                in_flight = asyncio.create_task(client.post("/rerank", json={"query": "q", "texts": texts}))
                await wait_until(engine.entered.is_set)
                # uvicorn cancels the calls still running once the grace has passed, and says so; the
                # engine lets its batch go then, or closing the batchers would wait for it.
                release = _OnMessage("graceful shutdown exceeded", engine.open.set)
                logging.getLogger("uvicorn.error").addHandler(release)
                try:
                    await running.server.stop(grace=0.5)
                finally:
                    logging.getLogger("uvicorn.error").removeHandler(release)
                response = await in_flight
        finally:
            engine.open.set()
    assert response.status_code == 503
    assert "the server is stopping" in response.json()["error"]
    statuses = [record.fields["status"] for record in caplog.records if record.name == "sidecar.access"]  # type: ignore[attr-defined]
    assert statuses == ["503"]
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert not [error for error in errors if "Exception in ASGI application" in error], errors


async def test_an_engine_failure_is_500_and_the_server_recovers(small_http_sidecar: RunningSidecar):
    engine = small_http_sidecar.engine
    original = engine.inner.forward

    def broken(batch):
        raise RuntimeError("simulated device error")

    engine.inner.forward = broken  # type: ignore[method-assign]
    async with httpx.AsyncClient(base_url=small_http_sidecar.http_url) as client:
        try:
            failed = await client.post("/rerank", json={"query": "q", "texts": ["a", "b"]})
        finally:
            engine.inner.forward = original  # type: ignore[method-assign]
        recovered = await client.post("/rerank", json={"query": "q", "texts": ["a"]})
    assert failed.status_code == 500
    assert failed.json()["error_type"] == "Backend"
    assert "simulated device error" in failed.json()["error"]
    assert recovered.status_code == 200
