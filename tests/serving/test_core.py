"""The serving core on its own, with no transport: load, rerank, stream, embed, info, drain."""

from __future__ import annotations

import ast
import asyncio
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest

import sidecar
from sidecar.composition import ModelAssembly, RuntimeFactory
from sidecar.errors import InvalidArgument, NotReady, ServingError
from sidecar.model.loading import ModelSource
from sidecar.serving.core import ServingCore, ServingState
from sidecar.serving.metrics import Metrics
from sidecar.serving.reranking import (
    Document,
    Ranking,
    RerankOptions,
    StreamBatch,
    StreamMessage,
    StreamSession,
)
from sidecar.serving.runtime import Runtime, load_runtime
from sidecar.settings import Settings
from sidecar.transport.grpc_api.status import STATUS_OF_ERROR
from tests.conftest import RecordingEngine, ReferenceScorer, recording_runtime

QUERY = "how do vaccines train the immune system"
TEXTS = ("Vaccines expose the immune system to an antigen.", "Bread rises because of yeast.", "B cells.")


@pytest.fixture(scope="module")
async def core(tiny_bert: Path) -> AsyncIterator[ServingCore]:
    with tempfile.TemporaryDirectory(prefix="sidecar-cache-") as cache_dir:
        settings = Settings(
            model=str(tiny_bert),
            engine="torch",
            precision="fp32",
            torch_compile="off",
            batch_workers=1,
            embed_model="",
            cache_dir=cache_dir,
        )
        serving = ServingCore(settings, Metrics())
        assert serving.state is ServingState.LOADING
        with pytest.raises(NotReady, match="still loading"):
            serving.require_reranker()
        serving.serve(await ModelAssembly(settings, serving.metrics, load_runtime).build())
        yield serving
        await serving.close()


def documents(*texts: str) -> list[Document]:
    return [Document(id=f"d{i}", text=text) for i, text in enumerate(texts)]


async def test_the_core_reranks_as_the_reference_does(core: ServingCore, reference: ReferenceScorer):
    ranking = await core.require_reranker().rerank(QUERY, documents(*TEXTS), RerankOptions(), None)
    expected = reference.scores(QUERY, TEXTS)
    by_index = {result.index: result.score for result in ranking.results}
    np.testing.assert_allclose([by_index[i] for i in range(len(TEXTS))], expected, atol=1e-5)
    assert ranking.usage.pairs == len(TEXTS)


async def test_scores_equal_as_served_are_ranked_by_index(core: ServingCore, monkeypatch):
    reranker = core.require_reranker()
    # Distinct in float64, one value in the float32 that gRPC carries.
    monkeypatch.setattr(reranker.scorer, "normalize", lambda raw: 0.5 + 1e-12 * raw.astype(np.float64))
    texts = ("cats", "the stock market fell", "B cells", "yeast", "rivers flood", "vaccines")
    ranking = await reranker.rerank(QUERY, documents(*texts), RerankOptions(), None)
    assert {result.score for result in ranking.results} == {0.5}
    assert [result.index for result in ranking.results] == list(range(len(texts)))


async def test_a_stream_session_answers_each_message_then_the_final_ranking(
    core: ServingCore, reference: ReferenceScorer
):
    async def messages() -> AsyncIterator[StreamMessage]:
        yield StreamMessage(documents(*TEXTS[:2]), query=QUERY, options=RerankOptions(top_n=2))
        yield StreamMessage(documents()[:0])
        yield StreamMessage([Document("d2", TEXTS[2])])

    items = [item async for item in StreamSession(core.require_reranker(), None).run(messages())]
    batches, final = items[:-1], items[-1]
    assert sorted(batch.batch for batch in batches if isinstance(batch, StreamBatch)) == [0, 2]
    assert isinstance(final, Ranking)
    expected = reference.scores(QUERY, TEXTS)
    assert [result.index for result in final.results] == list(np.argsort(-expected)[:2])


async def test_a_stream_refuses_options_after_its_first_message(core: ServingCore):
    async def messages() -> AsyncIterator[StreamMessage]:
        yield StreamMessage(documents(TEXTS[0]), query=QUERY)
        yield StreamMessage(documents(TEXTS[1]), query="another", fields_set=frozenset({"query"}))

    with pytest.raises(InvalidArgument, match="stream message 1 sets query"):
        async for _ in StreamSession(core.require_reranker(), None).run(messages()):
            pass


async def test_info_names_the_model_and_its_engine(core: ServingCore, tiny_bert: Path):
    info = core.info()
    assert info.ranking.model_id == tiny_bert.name  # the directory's name, never its path
    assert (info.ranking.engine, info.ranking.precision, info.ranking.model_kind) == (
        "torch",
        "fp32",
        "cross-encoder",
    )
    assert info.embedding is None
    assert info.server_version == sidecar.__version__


async def test_a_draining_core_refuses_new_requests(tiny_bert: Path):
    with tempfile.TemporaryDirectory(prefix="sidecar-cache-") as cache_dir:
        settings = Settings(
            model=str(tiny_bert), engine="torch", precision="fp32", torch_compile="off", cache_dir=cache_dir
        )
        serving = ServingCore(settings, Metrics())
        serving.serve(await ModelAssembly(settings, serving.metrics, load_runtime).build())
        serving.begin_draining()
        with pytest.raises(NotReady, match="shutting down"):
            serving.require_reranker()
        await serving.close()
        assert serving.state is ServingState.STOPPED


async def serving_tiny_bert(
    tiny_bert: Path, cache_dir: str, runtime_factory: RuntimeFactory, idle_release_after: float
) -> ServingCore:
    """A core serving the tiny model alone on uncompiled torch fp32, loaded and warmed up."""
    settings = Settings(
        model=str(tiny_bert),
        engine="torch",
        precision="fp32",
        torch_compile="off",
        embed_model="",
        cache_dir=cache_dir,
        idle_release_after=idle_release_after,
    )
    serving = ServingCore(settings, Metrics())
    serving.serve(await ModelAssembly(settings, serving.metrics, runtime_factory).build())
    return serving


@pytest.mark.parametrize(("idle_release_after", "releases"), [(60.0, 1), (0.0, 0)])
async def test_a_model_gives_back_its_warm_ups_scratch_memory_before_it_serves(
    tiny_bert: Path, idle_release_after: float, releases: int
):
    with tempfile.TemporaryDirectory(prefix="sidecar-cache-") as cache_dir:
        serving = await serving_tiny_bert(tiny_bert, cache_dir, recording_runtime, idle_release_after)
        try:
            engine = serving.ranking.engine
            assert isinstance(engine, RecordingEngine)
            for _ in range(50):  # the release runs on a model thread once the warm-up's batches end
                if engine.scratch_releases >= releases:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
            assert engine.batches  # the warm-up ran
            assert engine.scratch_releases == releases  # once, long before the idle time; never with 0
        finally:
            await serving.close()


async def test_a_core_closed_right_after_it_serves_stops_at_once(tiny_bert: Path):
    # Its batcher is then asked to give back the warm-up's scratch memory in the same loop turns as
    # it is cancelled; under Python 3.11, asyncio.wait_for swallowed that cancellation and close hung.
    with tempfile.TemporaryDirectory(prefix="sidecar-cache-") as cache_dir:
        serving = await serving_tiny_bert(tiny_bert, cache_dir, load_runtime, 60.0)
        await asyncio.wait_for(serving.close(), timeout=10)
        assert serving.state is ServingState.STOPPED


def _imported_modules(path: Path) -> Sequence[str]:
    tree = ast.parse(path.read_text())
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_no_layer_below_the_transport_imports_grpc():
    package = Path(sidecar.__file__).parent
    below_transport = [
        path
        for path in package.rglob("*.py")
        if "transport" not in path.relative_to(package).parts
        and path.name not in {"server.py", "healthcheck.py", "cli.py"}
    ]
    offenders = {
        str(path.relative_to(package)): module
        for path in below_transport
        for module in _imported_modules(path)
        if module == "grpc" or module.startswith(("grpc.", "grpc_", "rerank."))
    }
    assert not offenders


def test_every_error_maps_to_a_status():
    def subclasses(cls: type) -> set[type]:
        return {cls, *(grand for sub in cls.__subclasses__() for grand in subclasses(sub))}

    assert subclasses(ServingError) - {ServingError} <= set(STATUS_OF_ERROR)


def served_on(device: str) -> RuntimeFactory:
    """A runtime whose engine says it runs on ``device`` (it computes on the CPU all the same)."""

    def runtime(settings: Settings, source: ModelSource) -> Runtime:
        served = recording_runtime(settings, source)
        served.engine.device = device
        return served

    return runtime


@pytest.mark.parametrize(("device", "processes"), [("cpu", False), ("cuda", True)])
async def test_auto_tokenizes_in_processes_for_a_model_on_a_gpu_and_in_threads_on_a_cpu(
    tiny_bert: Path, reference: ReferenceScorer, device: str, processes: bool
):
    with tempfile.TemporaryDirectory(prefix="sidecar-cache-") as cache_dir:
        serving = await serving_tiny_bert(tiny_bert, cache_dir, served_on(device), idle_release_after=0.0)
        try:
            assert serving.models is not None
            pool = serving.models.tokenizer_pool
            assert pool.processes is processes
            info = serving.info()
            assert (info.tokenize_in, info.tokenizer_workers) == (
                "processes" if processes else "threads",
                pool.workers,
            )
            ranking = await serving.require_reranker().rerank(QUERY, documents(*TEXTS), RerankOptions(), None)
            by_index = {result.index: result.score for result in ranking.results}
            expected = reference.scores(QUERY, TEXTS)
            np.testing.assert_allclose([by_index[i] for i in range(len(TEXTS))], expected, atol=1e-5)
        finally:
            await serving.close()
        assert not pool._every_process  # closing the core stopped the pool's processes
