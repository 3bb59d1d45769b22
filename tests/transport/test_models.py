"""Several models in one sidecar, chosen per request by name."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from client.local_sidecar import free_port
from rerank.v1 import rerank_pb2, rerank_pb2_grpc
from sidecar.errors import ModelLoadError
from testkit.models import add_mean_pooling
from tests.conftest import ReferenceScorer, RunningSidecar, docs, running_sidecar

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
QUERY = "where does the cat sleep"
TEXTS = ("the cat sleeps on the mat", "stock prices fell", "a dog in the yard")


@pytest.fixture(scope="module")
async def two_models(tiny_bert: Path, tiny_bert_two_labels: Path) -> AsyncIterator[RunningSidecar]:
    models = f"one={tiny_bert},two={tiny_bert_two_labels}"
    # Tokenized in processes (the GPU's default), each given all three models' tokenizers.
    async with running_sidecar(
        models, embed_model=f"vectors={MINILM}", http_port=free_port(), tokenize_in="processes"
    ) as running:
        info = await running.stub.Info(rerank_pb2.InfoRequest(), timeout=10)
        assert info.tokenize_in == "processes"
        assert info.tokenizer_workers >= 1
        yield running


async def rerank(sidecar: RunningSidecar, model: str) -> np.ndarray:
    reply = await sidecar.stub.Rerank(
        rerank_pb2.RerankRequest(query=QUERY, documents=docs(*TEXTS), model=model), timeout=30
    )
    by_index = {result.index: result.score for result in reply.results}
    return np.array([by_index[index] for index in range(len(TEXTS))], dtype=np.float32)


async def test_each_request_is_scored_by_the_model_it_names(
    two_models: RunningSidecar, reference: ReferenceScorer, reference_two_labels: ReferenceScorer
):
    np.testing.assert_allclose(await rerank(two_models, "one"), reference.scores(QUERY, TEXTS), atol=1e-5)
    np.testing.assert_allclose(
        await rerank(two_models, "two"), reference_two_labels.scores(QUERY, TEXTS), atol=1e-5
    )
    np.testing.assert_array_equal(await rerank(two_models, ""), await rerank(two_models, "one"))  # the first


async def test_a_stream_is_scored_by_the_model_its_first_message_names(
    two_models: RunningSidecar, reference_two_labels: ReferenceScorer
):
    async def messages() -> AsyncIterator[rerank_pb2.RerankStreamRequest]:
        yield rerank_pb2.RerankStreamRequest(
            query=QUERY, model="two", documents=docs(*TEXTS[:2], ids=["a", "b"])
        )
        yield rerank_pb2.RerankStreamRequest(documents=docs(TEXTS[2], ids=["c"]))

    replies = [reply async for reply in two_models.stub.RerankStream(messages(), timeout=30)]
    final = replies[-1].final
    by_index = {result.index: result.score for result in final.results}
    scores = [by_index[index] for index in range(len(TEXTS))]
    np.testing.assert_allclose(scores, reference_two_labels.scores(QUERY, TEXTS), atol=1e-5)


async def test_a_later_stream_message_may_not_change_the_model(two_models: RunningSidecar):
    async def messages() -> AsyncIterator[rerank_pb2.RerankStreamRequest]:
        yield rerank_pb2.RerankStreamRequest(query=QUERY, model="one", documents=docs(TEXTS[0], ids=["a"]))
        yield rerank_pb2.RerankStreamRequest(model="two", documents=docs(TEXTS[1], ids=["b"]))

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        _ = [reply async for reply in two_models.stub.RerankStream(messages(), timeout=30)]
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stream message 1 sets model" in raised.value.details()


async def test_an_unknown_model_is_refused_naming_the_models_served(two_models: RunningSidecar):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await rerank(two_models, "three")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'three' is not served here" in raised.value.details()
    assert "'one', 'two'" in raised.value.details()
    embedder = rerank_pb2_grpc.EmbedderStub(two_models.channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await embedder.Embed(rerank_pb2.EmbedRequest(texts=["a"], model="one"), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'vectors'" in raised.value.details()
    assert two_models.server.core.served  # nothing was queued for any model
    assert all(served.batcher.queued_pairs == 0 for served in two_models.server.core.served)


async def test_http_chooses_by_model_and_answers_an_unknown_one_with_404(two_models: RunningSidecar):
    async with httpx.AsyncClient(base_url=two_models.http_url, timeout=30) as client:
        chosen = await client.post(
            "/v2/rerank", json={"model": "two", "query": QUERY, "documents": list(TEXTS)}
        )
        unknown = await client.post("/v1/rerank", json={"model": "three", "query": QUERY, "documents": ["a"]})
        embedded = await client.post("/v1/embeddings", json={"model": "vectors", "input": "a"})
        not_embedding = await client.post("/v1/embeddings", json={"model": "one", "input": "a"})
    assert chosen.status_code == 200
    grpc_scores = await rerank(two_models, "two")
    by_index = {result["index"]: result["relevance_score"] for result in chosen.json()["results"]}
    http_scores = np.array([by_index[index] for index in range(len(TEXTS))], dtype=np.float32)
    np.testing.assert_array_equal(http_scores, grpc_scores)
    assert unknown.status_code == 404
    assert "'one', 'two'" in unknown.json()["message"]
    assert embedded.status_code == 200
    assert not_embedding.status_code == 404
    assert not_embedding.json()["error"]["code"] == "model_not_found"
    assert not_embedding.json()["error"]["param"] == "model"


async def test_info_lists_every_model_and_marks_the_defaults(two_models: RunningSidecar, tiny_bert: Path):
    info = await two_models.stub.Info(rerank_pb2.InfoRequest(), timeout=30)
    listed = [(model.name, model.service, model.is_default, model.model_id) for model in info.models]
    assert listed == [
        ("one", "rerank", True, tiny_bert.name),
        ("two", "rerank", False, listed[1][3]),
        ("vectors", "embed", True, MINILM),
    ]
    assert info.model_id == tiny_bert.name  # the single-model fields describe the default
    assert all(model.engine == "torch" for model in info.models)
    vectors = [(model.dims, model.pooling, model.normalized) for model in info.models]
    assert vectors == [(0, "", False), (0, "", False), (384, "mean", True)]


async def test_two_models_of_one_name_stop_the_start(tiny_bert: Path, tmp_path: Path):
    twin = tmp_path / "elsewhere" / tiny_bert.name
    twin.parent.mkdir()
    twin.symlink_to(tiny_bert, target_is_directory=True)
    with pytest.raises(ModelLoadError, match="two models are named"):
        async with running_sidecar(f"{tiny_bert},{twin}"):
            pass


async def test_a_single_model_sidecar_takes_its_own_name_and_refuses_another(
    sidecar: RunningSidecar, tiny_bert: Path
):
    by_name = await rerank(sidecar, tiny_bert.name)
    np.testing.assert_array_equal(by_name, await rerank(sidecar, ""))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await rerank(sidecar, "rerank-v3.5")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"the reranking models served are: {tiny_bert.name!r}" in raised.value.details()


async def test_a_name_given_to_a_reranker_and_to_another_embedder_stops_the_start(tiny_bert: Path):
    # Metrics and logs tell models apart by name: two models of one name would share their series.
    with pytest.raises(ModelLoadError, match="--model and --embed-model name two models 'm'"):
        async with running_sidecar(f"m={tiny_bert}", embed_model=f"m={MINILM}"):
            pass


async def test_one_directory_written_several_ways_is_one_model_named_by_its_directory(
    tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tiny_bert)
    spellings = f"a={tiny_bert},b={tiny_bert}/,c=../{tiny_bert.name},."
    async with running_sidecar(spellings, revision="main") as running:
        info = await running.stub.Info(rerank_pb2.InfoRequest(), timeout=30)
        assert len(running.server.core.served) == 1
        listed = [(model.name, model.model_id) for model in info.models]
        assert listed == [(name, tiny_bert.name) for name in ("a", "b", "c", tiny_bert.name)]
        assert info.model_revision != "main"  # a directory has no Hub revision
        scores = await rerank(running, tiny_bert.name)
        np.testing.assert_array_equal(scores, await rerank(running, "a"))


def small_embedding_model(directory: Path, tiny_bert: Path) -> Path:
    """The tiny BERT as a sentence-transformers model: mean pooling over its narrow hidden states."""
    shutil.copytree(tiny_bert, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    return add_mean_pooling(directory)


async def test_the_openapi_document_allows_every_embedder_s_dimensions(tiny_bert: Path, tmp_path: Path):
    small = small_embedding_model(tmp_path / "small", tiny_bert)
    embedders = f"{MINILM},small={small}"
    async with running_sidecar(tiny_bert, embed_model=embedders, http_port=free_port()) as running:
        small_dims = running.server.core.models.embedders["small"].model.dims
        async with httpx.AsyncClient(base_url=running.http_url, timeout=30) as client:
            schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
            embedded = await client.post(
                "/v1/embeddings", json={"model": "small", "input": "a", "dimensions": small_dims}
            )
        info = await running.stub.Info(rerank_pb2.InfoRequest(), timeout=30)
    assert embedded.status_code == 200, embedded.text
    assert len(embedded.json()["data"][0]["embedding"]) == small_dims
    assert {model.name: model.dims for model in info.models if model.service == "embed"} == {
        MINILM: 384,
        "small": small_dims,
    }
    openai_dims = schemas["OpenAIEmbeddingsRequest"]["properties"]["dimensions"]["anyOf"][0]["enum"]
    assert openai_dims == sorted({small_dims, 384})
    assert schemas["TeiEmbedRequest"]["properties"]["dimensions"]["anyOf"][0]["enum"] == [384]  # the default


async def test_a_model_served_under_two_names_is_labelled_by_its_first_in_every_metric(tiny_bert: Path):
    # One model, one queue and one engine: a dashboard joining the call counts to the engine and queue
    # series by model finds them under one name, whichever name the requests chose.
    async with running_sidecar(f"reranker={tiny_bert},rerank-english-v3.0={tiny_bert}") as running:
        await rerank(running, "rerank-english-v3.0")
        registry = running.server.core.metrics.registry
        method = "/rerank.v1.Reranker/Rerank"
        calls = {"method": method, "code": "OK"}
        assert registry.get_sample_value("rerank_requests_total", {**calls, "model": "reranker"}) == 1
        assert (
            registry.get_sample_value("rerank_requests_total", {**calls, "model": "rerank-english-v3.0"})
            is None
        )
        assert registry.get_sample_value("rerank_queued_pairs", {"model": "reranker"}) == 0
        engines = [
            sample.labels["model"]
            for metric in registry.collect()
            for sample in metric.samples
            if sample.name == "rerank_engine_info"
        ]
        assert engines == ["reranker"]
