"""The Embedder service, and reranking with an embedding model, on the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from rerank.v1 import rerank_pb2, rerank_pb2_grpc
from testkit.models import bert_tokenizer_dir
from tests.conftest import RunningSidecar, docs, running_sidecar

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = [
    "Cats are obligate carnivores and eat meat.",
    "The stock market fell sharply on Tuesday.",
    "Kittens need food rich in protein.",
    "",
]


@pytest.fixture(scope="module")
def reference_encoder() -> SentenceTransformer:
    return SentenceTransformer(str(bert_tokenizer_dir()), device="cpu")


@pytest.fixture(scope="module")
async def embedding_sidecar(tiny_bert: Path) -> AsyncIterator[RunningSidecar]:
    async with running_sidecar(tiny_bert, embed_model=MINILM) as running:
        yield running


async def test_embeddings_equal_sentence_transformers(embedding_sidecar: RunningSidecar, reference_encoder):
    stub = rerank_pb2_grpc.EmbedderStub(embedding_sidecar.channel)
    response = await stub.Embed(rerank_pb2.EmbedRequest(texts=TEXTS), timeout=30)
    vectors = np.array([embedding.values for embedding in response.embeddings])
    assert response.dims == 384
    assert vectors.shape == (len(TEXTS), 384)
    assert response.model_id == MINILM
    np.testing.assert_allclose(vectors, reference_encoder.encode(TEXTS), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert response.usage.pairs == len(TEXTS)


async def test_info_reports_both_models(embedding_sidecar: RunningSidecar):
    info = await embedding_sidecar.stub.Info(rerank_pb2.InfoRequest(), timeout=10)
    assert info.model_kind == "cross-encoder"
    assert info.HasField("embedding_model")
    assert info.embedding_model.model_id == MINILM
    assert info.embedding_model.dims == 384
    assert info.embedding_model.pooling == "mean"
    assert info.embedding_model.normalized
    assert info.embedding_model.max_length == 256


@pytest.mark.parametrize(
    ("request_fields", "phrase"),
    [
        ({"texts": []}, "texts is empty"),
        ({"texts": ["x"] * 1001}, "too many texts: 1001"),
        ({"texts": ["x"], "max_length": 257}, "exceeds the embedding model's limit of 256"),
        ({"texts": ["x"], "truncation_direction": 5}, "truncation_direction has unknown value 5"),
    ],
)
async def test_bad_embed_requests(embedding_sidecar: RunningSidecar, request_fields: dict, phrase: str):
    stub = rerank_pb2_grpc.EmbedderStub(embedding_sidecar.channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Embed(rerank_pb2.EmbedRequest(**request_fields), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert phrase in raised.value.details()


async def test_embedder_is_unimplemented_when_disabled(sidecar: RunningSidecar):
    stub = rerank_pb2_grpc.EmbedderStub(sidecar.channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Embed(rerank_pb2.EmbedRequest(texts=["x"]), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_an_embedding_model_setting_without_a_model_offers_no_embedder(tiny_bert: Path):
    async with running_sidecar(tiny_bert, embed_model=" , ") as running:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await rerank_pb2_grpc.EmbedderStub(running.channel).Embed(
                rerank_pb2.EmbedRequest(texts=["x"]), timeout=10
            )
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_an_embedding_model_reranks_by_cosine(reference_encoder):
    async with running_sidecar(Path(MINILM), embed_model=MINILM) as running:
        info = await running.stub.Info(rerank_pb2.InfoRequest(), timeout=10)
        query = "what do cats eat"
        normalized = await running.stub.Rerank(
            rerank_pb2.RerankRequest(query=query, documents=docs(*TEXTS)), timeout=30
        )
        raw = await running.stub.Rerank(
            rerank_pb2.RerankRequest(query=query, documents=docs(*TEXTS), raw_scores=True), timeout=30
        )
        assert len(running.server.core.served) == 1  # one model, one engine, one batcher serve both services
    assert info.model_kind == "bi-encoder"
    assert info.model_id == MINILM
    vectors = reference_encoder.encode([query, *TEXTS])
    cosine = vectors[1:] @ vectors[0]
    by_index = sorted(raw.results, key=lambda result: result.index)
    np.testing.assert_allclose([r.score for r in by_index], cosine, atol=1e-5)
    np.testing.assert_allclose(
        [r.score for r in sorted(normalized.results, key=lambda r: r.index)], (cosine + 1) / 2, atol=1e-5
    )
    assert normalized.results[0].index == 0  # real weights: the cat-food passage ranks first
