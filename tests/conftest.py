"""Shared fixtures: tiny local models, an in-process sidecar on 127.0.0.1, and a reference scorer."""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rerank.v1 import rerank_pb2, rerank_pb2_grpc
from sidecar.model.batch import TokenBatch
from sidecar.model.engines.base import Engine
from sidecar.model.loading import ModelSource
from sidecar.server import SidecarServer
from sidecar.serving.runtime import Runtime, load_runtime
from sidecar.settings import Settings
from tests.models import save_tiny_bert


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-1-label"), num_labels=1)


@pytest.fixture(scope="session")
def tiny_bert_two_labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-2-labels"), num_labels=2, seed=1)


class RecordingEngine(Engine):
    """Wraps a real engine: records every batch it runs, and can be paused to hold work in the queue."""

    name = "recording"

    def __init__(self, inner: Engine) -> None:
        super().__init__(precision=inner.precision, device=inner.device)
        self.name = inner.name  # type: ignore[misc]  # Info reports the engine underneath
        self.compiled = inner.compiled
        self.batch_variance = inner.batch_variance
        self.inner = inner
        self.batches: list[TokenBatch] = []
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        self.scratch_releases = 0

    def forward(self, batch: TokenBatch) -> np.ndarray:
        self.entered.set()
        if not self.open.wait(timeout=60):
            raise TimeoutError("test left the engine paused")
        self.batches.append(batch)
        return self.inner.forward(batch)

    def release_scratch(self) -> None:
        self.scratch_releases += 1
        self.inner.release_scratch()

    def saw_token(self, token_id: int) -> bool:
        return any(bool((batch.input_ids == token_id).any()) for batch in self.batches)


def recording_runtime(settings: Settings, source: ModelSource) -> Runtime:
    runtime = load_runtime(settings, source)
    return dataclasses.replace(runtime, engine=RecordingEngine(runtime.engine))


class RunningSidecar:
    def __init__(self, server: SidecarServer, channel: grpc.aio.Channel) -> None:
        self.server = server
        self.channel = channel
        self.stub = rerank_pb2_grpc.RerankerStub(channel)

    @property
    def http_url(self) -> str:
        assert self.server.http is not None, "start it with http_port=free_port()"
        return f"http://127.0.0.1:{self.server.http.port}"

    @property
    def engine(self) -> RecordingEngine:
        assert self.server.core.ranking is not None
        engine = self.server.core.ranking.engine
        assert isinstance(engine, RecordingEngine)
        return engine


@asynccontextmanager
async def running_sidecar(
    model: Path | str,
    *,
    load: bool = True,
    runtime_factory: Callable[[Settings, ModelSource], Runtime] = recording_runtime,
    **overrides: object,
) -> AsyncIterator[RunningSidecar]:
    # torch fp32 unless a test asks otherwise: these tests compare scores with transformers to 1e-5,
    # closer than the parity gate lets lower precisions (which --precision auto may pick) come.
    # The torch fp32 engine, uncompiled, and no embedder unless a test asks: exact parity with the
    # reference and a fast start. One batch worker, so a test that holds the engine holds every batch.
    options: dict[str, object] = {
        "engine": "torch",
        "precision": "fp32",
        "torch_compile": "off",
        "batch_workers": 1,
        "embed_model": "",
        # No score cache unless a test asks: tests repeat requests to count batches, hold the engine or
        # fill the queue, which a cached answer would skip (tests/serving/test_score_cache.py tests it).
        "score_cache_size": 0,
        # Selection in this process, where a test's monkeypatched engines apply; a test of the child
        # process's selection starts the server as a subprocess (tests/serving/test_warm_start.py).
        "select_in_subprocess": False,
        "metrics_port": 0,
        "host": "127.0.0.1",
        "port": 0,
        "grace_period": 2.0,
        **overrides,
    }
    # A cache of its own unless a test shares one: a remembered engine choice must not leak between tests.
    with tempfile.TemporaryDirectory(prefix="sidecar-cache-") as cache_dir:
        settings = Settings(model=str(model), **{"cache_dir": cache_dir, **options})  # type: ignore[arg-type]
        server = SidecarServer(settings, runtime_factory=runtime_factory)
        await server.start()
        try:
            if load:
                await server.load()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                yield RunningSidecar(server, channel)
        finally:
            await server.stop(grace=1.0)


@pytest.fixture(scope="session")
async def sidecar(tiny_bert: Path) -> AsyncIterator[RunningSidecar]:
    async with running_sidecar(tiny_bert) as running:
        yield running


@pytest.fixture(scope="session")
async def sidecar_two_labels(tiny_bert_two_labels: Path) -> AsyncIterator[RunningSidecar]:
    async with running_sidecar(tiny_bert_two_labels) as running:
        yield running


class ReferenceScorer:
    """A plain transformers forward pass, one pair at a time: the ground truth for the server's scores."""

    def __init__(self, model_dir: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()

    def logits(
        self, query: str, documents: Sequence[str], max_length: int = 512, side: str = "right"
    ) -> np.ndarray:
        self.tokenizer.truncation_side = side
        rows = []
        for document in documents:
            # Lists, as CrossEncoder passes them: a lone empty string would be read as "no pair".
            inputs = self.tokenizer(
                [query],
                [document],
                truncation="only_second",
                max_length=max_length,
                padding=False,
                return_tensors="pt",
            )
            with torch.inference_mode():
                rows.append(self.model(**inputs).logits[0].float().numpy())
        return np.stack(rows)

    def ids_logits(self, input_ids: list[int]) -> np.ndarray:
        """Logits of one pair given as token ids (special tokens included, token types from the [SEP])."""
        first_sep = input_ids.index(self.tokenizer.sep_token_id)
        token_type_ids = [0] * (first_sep + 1) + [1] * (len(input_ids) - first_sep - 1)
        with torch.inference_mode():
            return (
                self.model(input_ids=torch.tensor([input_ids]), token_type_ids=torch.tensor([token_type_ids]))
                .logits[0]
                .float()
                .numpy()
            )

    def scores(self, query: str, documents: Sequence[str], **kwargs: object) -> np.ndarray:
        return normalized(self.logits(query, documents, **kwargs))  # type: ignore[arg-type]


def normalized(logits: np.ndarray) -> np.ndarray:
    if logits.shape[-1] == 1:
        return 1.0 / (1.0 + np.exp(-logits[..., 0]))
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (exp / exp.sum(axis=-1, keepdims=True))[..., 1]


@pytest.fixture(scope="session")
def reference(tiny_bert: Path) -> ReferenceScorer:
    return ReferenceScorer(tiny_bert)


@pytest.fixture(scope="session")
def reference_two_labels(tiny_bert_two_labels: Path) -> ReferenceScorer:
    return ReferenceScorer(tiny_bert_two_labels)


def docs(*texts: str, ids: Sequence[str] | None = None) -> list[rerank_pb2.Document]:
    ids = ids if ids is not None else [f"doc-{i}" for i in range(len(texts))]
    return [rerank_pb2.Document(id=doc_id, text=text) for doc_id, text in zip(ids, texts, strict=True)]


async def wait_until(predicate: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.01)
