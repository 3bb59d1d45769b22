"""The exact score cache: repeated pairs answered bit for bit without the model, a key that covers every
part of a request that changes a score, LRU eviction, and no cache where it would not be exact."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest

from sidecar.composition import ModelAssembly
from sidecar.errors import DeadlineExpired
from sidecar.model.engines.torch_engine import torch_batch_variance
from sidecar.model.loading import ModelSource
from sidecar.model.tokenization import Truncation
from sidecar.serving.core import ServingCore
from sidecar.serving.metrics import Metrics
from sidecar.serving.reranking import (
    Document,
    Ranking,
    Reranker,
    RerankOptions,
    StreamBatch,
    StreamMessage,
    StreamSession,
)
from sidecar.serving.runtime import Runtime
from sidecar.serving.score_cache import ScoreCache
from sidecar.settings import Settings
from testkit.models import save_tiny_qwen3_reranker
from tests.conditions import needs_native_bf16
from tests.conftest import RecordingEngine, ReferenceScorer, recording_runtime

QUERY = "how do vaccines train the immune system"
TEXTS = (
    "Vaccines expose the immune system to an antigen.",
    "Bread rises because of yeast.",
    "B cells make antibodies after an infection, and memory cells remember the antigen for years.",
    "",
)


@asynccontextmanager
async def serving_core(model: Path, runtime_factory=recording_runtime, **overrides: object):
    """A core serving ``model`` on torch fp32 with one batch worker and the score cache on."""
    with tempfile.TemporaryDirectory(prefix="sidecar-cache-") as cache_dir:
        options: dict[str, object] = {
            "engine": "torch",
            "precision": "fp32",
            "torch_compile": "off",
            "batch_workers": 1,
            "embed_model": "",
            "select_in_subprocess": False,
            "score_cache_size": 1000,
            **overrides,
        }
        settings = Settings(model=str(model), cache_dir=cache_dir, **options)  # type: ignore[arg-type]
        core = ServingCore(settings, Metrics())
        core.serve(await ModelAssembly(settings, core.metrics, runtime_factory).build())
        try:
            yield core
        finally:
            await core.close()


@pytest.fixture(scope="module")
async def core(tiny_bert: Path) -> AsyncIterator[ServingCore]:
    async with serving_core(tiny_bert) as serving:
        yield serving


def reranker_of(core: ServingCore) -> Reranker:
    return core.require_reranker()


def engine_of(core: ServingCore) -> RecordingEngine:
    engine = core.require_reranker().batcher.engine
    assert isinstance(engine, RecordingEngine)
    return engine


def documents(*texts: str) -> list[Document]:
    return [Document(id=f"d{i}", text=text) for i, text in enumerate(texts)]


def scores_by_index(ranking: Ranking) -> list[float]:
    return [result.score for result in sorted(ranking.results, key=lambda result: result.index)]


async def rerank(core: ServingCore, query: str, texts: Sequence[str], **options: object) -> Ranking:
    return await reranker_of(core).rerank(query, documents(*texts), RerankOptions(**options), None)  # type: ignore[arg-type]


@pytest.mark.parametrize("raw_scores", [False, True], ids=["normalized", "raw"])
async def test_a_repeated_request_is_answered_from_the_cache_bit_for_bit_without_a_batch(
    core: ServingCore, reference: ReferenceScorer, raw_scores: bool
):
    query = f"{QUERY} ({'raw' if raw_scores else 'normalized'})"
    engine = engine_of(core)
    computed = await rerank(core, query, TEXTS, raw_scores=raw_scores)
    batches_run = len(engine.batches)
    cached = await rerank(core, query, TEXTS, raw_scores=raw_scores)

    assert (computed.usage.cached_pairs, computed.usage.pairs, computed.usage.chunks) == (0, 4, 4)
    assert computed.usage.batches >= 1
    assert len(engine.batches) == batches_run  # the second request reached no batch
    usage = cached.usage
    assert (usage.pairs, usage.cached_pairs, usage.chunks, usage.tokens, usage.batches) == (4, 4, 0, 0, 0)
    assert scores_by_index(cached) == scores_by_index(computed)  # exactly, not approximately
    assert [result.index for result in cached.results] == [result.index for result in computed.results]
    expected = reference.logits(query, TEXTS)[:, 0] if raw_scores else reference.scores(query, TEXTS)
    np.testing.assert_allclose(scores_by_index(cached), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("raw_scores", [False, True], ids=["normalized", "raw"])
async def test_the_other_form_of_a_cached_score_is_what_computing_it_gives(
    core: ServingCore, tiny_bert: Path, raw_scores: bool
):
    """The cache keeps raw scores: a request for the other form of scores cached by a request for one
    gets the bits that a server without the cache computes."""
    query = f"{QUERY} (the other form, {raw_scores})"
    await rerank(core, query, TEXTS, raw_scores=not raw_scores)
    from_cache = await rerank(core, query, TEXTS, raw_scores=raw_scores)
    async with serving_core(tiny_bert, score_cache_size=0) as uncached:
        computed = await rerank(uncached, query, TEXTS, raw_scores=raw_scores)
    assert (from_cache.usage.cached_pairs, computed.usage.cached_pairs) == (len(TEXTS), 0)
    assert scores_by_index(from_cache) == scores_by_index(computed)


async def test_a_request_partly_cached_computes_only_the_rest_and_keeps_document_order(
    core: ServingCore, reference: ReferenceScorer
):
    query = f"{QUERY} (partly)"
    first = await rerank(core, query, TEXTS[:2])
    texts = (TEXTS[2], TEXTS[0], TEXTS[3], TEXTS[1])
    engine = engine_of(core)
    batches_before = len(engine.batches)
    mixed = await rerank(core, query, texts)

    assert (mixed.usage.pairs, mixed.usage.cached_pairs, mixed.usage.chunks) == (4, 2, 2)
    ran = engine.batches[batches_before:]
    assert sum(len(batch.input_ids) for batch in ran) == 2  # only the two new documents
    scores = scores_by_index(mixed)
    assert [scores[1], scores[3]] == scores_by_index(first)
    np.testing.assert_allclose(scores, reference.scores(query, texts), atol=1e-5, rtol=0)
    assert [result.id for result in sorted(mixed.results, key=lambda r: r.index)] == ["d0", "d1", "d2", "d3"]


async def test_a_stream_is_answered_from_the_cache_bit_for_bit(core: ServingCore):
    query = f"{QUERY} (stream)"

    async def stream() -> list[StreamBatch | Ranking]:
        async def messages() -> AsyncIterator[StreamMessage]:
            yield StreamMessage(documents(*TEXTS[:2]), query=query, options=RerankOptions(raw_scores=True))
            yield StreamMessage([Document("d2", TEXTS[2]), Document("d3", TEXTS[3])])

        return [item async for item in StreamSession(reranker_of(core), None).run(messages())]

    engine = engine_of(core)
    computed = await stream()
    batches_run = len(engine.batches)
    cached = await stream()

    assert len(engine.batches) == batches_run
    final_computed, final_cached = computed[-1], cached[-1]
    assert isinstance(final_computed, Ranking)
    assert isinstance(final_cached, Ranking)
    assert (final_computed.usage.cached_pairs, final_cached.usage.cached_pairs) == (0, 4)
    assert (final_cached.usage.pairs, final_cached.usage.batches) == (4, 0)
    assert scores_by_index(final_cached) == scores_by_index(final_computed)

    def batch_scores(items: list[StreamBatch | Ranking]) -> dict[int, list[float]]:
        return {
            item.batch: [r.score for r in item.results] for item in items if isinstance(item, StreamBatch)
        }

    assert batch_scores(cached) == batch_scores(computed)
    # A unary request for the same pairs is answered from what the stream computed.
    unary = await rerank(core, query, TEXTS, raw_scores=True)
    assert unary.usage.cached_pairs == 4
    assert scores_by_index(unary) == scores_by_index(final_computed)


# Per part of the key, how a request differs in it alone: what it appends to the query and to the
# document, and its options.
CHANGES: dict[str, tuple[str, str, dict[str, object]]] = {
    "query": ("?", "", {}),
    "text": ("", " ", {}),
    "max_length": ("", "", {"max_length": 64}),
    "truncation": ("", "", {"truncation": Truncation.LEFT}),
    "chunking": ("", "", {"chunk": True}),
    "max_chunks_per_doc": ("", "", {"chunk": True, "max_chunks_per_doc": 2}),
    "chunk_overlap": ("", "", {"chunk": True, "chunk_overlap": 4}),
    "truncate": ("", "", {"truncate": False}),
}


@pytest.mark.parametrize("change", CHANGES)
async def test_a_change_of_any_part_of_the_key_misses(core: ServingCore, change: str):
    query, text = f"{QUERY} (key: {change})", TEXTS[2]
    await rerank(core, query, [text])
    assert (await rerank(core, query, [text])).usage.cached_pairs == 1
    query_suffix, text_suffix, options = CHANGES[change]
    changed = await rerank(core, query + query_suffix, [text + text_suffix], **options)
    assert changed.usage.cached_pairs == 0
    assert changed.usage.chunks >= 1


async def test_options_that_do_not_change_a_score_still_hit(core: ServingCore):
    query = f"{QUERY} (top_n, return_text)"
    computed = await rerank(core, query, TEXTS)
    cached = await rerank(core, query, TEXTS, top_n=2, return_text=True)
    assert cached.usage.cached_pairs == len(TEXTS)
    assert [r.score for r in cached.results] == [r.score for r in computed.results[:2]]
    assert [r.text for r in cached.results] == [TEXTS[r.index] for r in computed.results[:2]]


async def test_the_instruction_is_part_of_the_key(tmp_path: Path):
    model = save_tiny_qwen3_reranker(tmp_path / "qwen3-reranker")
    async with serving_core(model) as core:
        first = await rerank(core, QUERY, TEXTS[:2], instruction="Judge whether the passage answers.")
        again = await rerank(core, QUERY, TEXTS[:2], instruction="Judge whether the passage answers.")
        other = await rerank(core, QUERY, TEXTS[:2], instruction="Judge whether the passage is medical.")
    assert (first.usage.cached_pairs, again.usage.cached_pairs, other.usage.cached_pairs) == (0, 2, 0)
    assert scores_by_index(again) == scores_by_index(first)


async def test_a_full_cache_evicts_the_least_recently_used_pair(tiny_bert: Path):
    a, b, c, d = (f"document {name}: {TEXTS[2]}" for name in "abcd")
    async with serving_core(tiny_bert, score_cache_size=3) as core:
        await rerank(core, QUERY, [a, b, c])
        assert (await rerank(core, QUERY, [a])).usage.cached_pairs == 1  # a is now the most recent
        await rerank(core, QUERY, [d])  # evicts b, the least recently used
        assert len(reranker_of(core).scorer.score_cache) == 3
        assert (await rerank(core, QUERY, [a, c, d])).usage.cached_pairs == 3
        assert (await rerank(core, QUERY, [b])).usage.cached_pairs == 0


def test_the_lru_keeps_at_most_its_size_and_refreshes_what_it_answers():
    cache = ScoreCache(2)
    cache.put([b"a", b"b"], [1.0, 2.0])
    assert cache.get([b"a"]) == [1.0]
    cache.put([b"c"], [3.0])
    assert cache.get([b"a", b"b", b"c"]) == [1.0, None, 3.0]
    assert (len(cache), cache.hits, cache.misses) == (2, 3, 1)


def test_only_finite_scores_are_kept():
    cache = ScoreCache(4)
    cache.put([b"nan", b"inf", b"ok"], [float("nan"), float("-inf"), 0.5])
    assert cache.get([b"nan", b"inf", b"ok"]) == [None, None, 0.5]


async def test_size_0_turns_the_cache_off(tiny_bert: Path):
    async with serving_core(tiny_bert, score_cache_size=0) as core:
        engine = engine_of(core)
        await rerank(core, QUERY, TEXTS)
        batches_run = len(engine.batches)
        again = await rerank(core, QUERY, TEXTS)
        info = core.info().ranking.score_cache
        hits = core.metrics.registry.get_sample_value(
            "rerank_score_cache_hits_total", {"model": tiny_bert.name}
        )
        misses = core.metrics.registry.get_sample_value(
            "rerank_score_cache_misses_total", {"model": tiny_bert.name}
        )
    assert again.usage.cached_pairs == 0
    assert len(engine.batches) > batches_run
    assert (info.serves, info.max_pairs, info.pairs) == (False, 0, 0)
    assert "--score-cache-size is 0" in info.why_not_serving
    assert (hits, misses) == (0, 0)


def bf16_like_runtime(settings: Settings, source: ModelSource) -> Runtime:
    """The fp32 engine standing in for torch bf16, which not every CPU runs: it declares bf16's
    batch variance, which is all the cache reads."""
    runtime = recording_runtime(settings, source)
    runtime.engine.batch_variance = torch_batch_variance("bf16")
    return runtime


@pytest.mark.parametrize(
    "runtime_factory",
    [
        pytest.param(bf16_like_runtime, id="declared-variant"),
        pytest.param(recording_runtime, id="torch-bf16", marks=needs_native_bf16),
    ],
)
async def test_an_engine_that_is_not_batch_invariant_never_uses_the_cache(tiny_bert: Path, runtime_factory):
    precision = "bf16" if runtime_factory is recording_runtime else "fp32"
    async with serving_core(tiny_bert, runtime_factory=runtime_factory, precision=precision) as core:
        engine = engine_of(core)
        first = await rerank(core, QUERY, TEXTS)
        batches_run = len(engine.batches)
        again = await rerank(core, QUERY, TEXTS)
        info = core.info().ranking.score_cache
        cached_pairs = len(reranker_of(core).scorer.score_cache)
    assert (first.usage.cached_pairs, again.usage.cached_pairs, cached_pairs) == (0, 0, 0)
    assert len(engine.batches) > batches_run
    assert not info.serves
    assert "not batch-invariant" in info.why_not_serving
    assert "bf16" in info.why_not_serving


async def test_an_engine_that_takes_over_never_gets_the_entries_of_the_one_before(tiny_bert: Path):
    async with serving_core(tiny_bert) as core:
        reranker = reranker_of(core)
        first = engine_of(core)
        await rerank(core, QUERY, TEXTS)
        assert (await rerank(core, QUERY, TEXTS)).usage.cached_pairs == len(TEXTS)
        # The same name, precision and device: only the engine itself differs.
        second = RecordingEngine(first.inner)
        reranker.batcher.replace_engine(second)
        after = await rerank(core, QUERY, TEXTS)
        assert after.usage.cached_pairs == 0
        assert len(second.batches) >= 1
        assert (await rerank(core, QUERY, TEXTS)).usage.cached_pairs == len(TEXTS)


async def test_scores_of_rows_run_while_an_engine_took_over_are_not_kept(tiny_bert: Path):
    async with serving_core(tiny_bert) as core:
        reranker = reranker_of(core)
        first = engine_of(core)
        first.open.clear()
        first.entered.clear()
        running = asyncio.create_task(rerank(core, QUERY, TEXTS))
        await asyncio.to_thread(first.entered.wait, 10)
        reranker.batcher.replace_engine(RecordingEngine(first.inner))
        first.open.set()
        computed = await running
        assert computed.usage.cached_pairs == 0
        assert len(reranker.scorer.score_cache) == 0
        assert (await rerank(core, QUERY, TEXTS)).usage.cached_pairs == 0


async def test_a_cached_request_does_not_wait_behind_the_queue(tiny_bert: Path):
    async with serving_core(tiny_bert) as core:
        engine = engine_of(core)
        await rerank(core, QUERY, TEXTS)
        engine.open.clear()
        engine.entered.clear()
        try:
            held = asyncio.create_task(rerank(core, "another query that must wait", TEXTS))
            await asyncio.to_thread(engine.entered.wait, 10)
            started = time.monotonic()
            cached = await asyncio.wait_for(rerank(core, QUERY, TEXTS), timeout=5)
            assert not held.done()
        finally:
            engine.open.set()
        await held
    assert cached.usage.cached_pairs == len(TEXTS)
    assert cached.usage.queue_ns == 0
    assert time.monotonic() - started < 5


async def test_only_the_pairs_not_cached_count_against_the_queue_limit(tiny_bert: Path):
    async with serving_core(tiny_bert, max_queued_pairs=4, max_batch_pairs=4) as core:
        await rerank(core, QUERY, TEXTS)
        # Six documents would not fit a queue of four, but only the two new ones are queued.
        mixed = await rerank(core, QUERY, [*TEXTS, "a fifth document", "a sixth document"])
    assert (mixed.usage.pairs, mixed.usage.cached_pairs, mixed.usage.chunks) == (6, 4, 2)


async def test_a_failed_request_leaves_nothing_in_the_cache(tiny_bert: Path):
    async with serving_core(tiny_bert) as core:
        engine = engine_of(core)
        reranker = reranker_of(core)
        engine.open.clear()
        try:
            with pytest.raises(DeadlineExpired):
                await reranker.rerank(QUERY, documents(*TEXTS), RerankOptions(), time.monotonic() + 0.2)
        finally:
            engine.open.set()
        await asyncio.sleep(0.1)  # the withdrawn batch comes back from the engine
        assert len(reranker.scorer.score_cache) == 0
        assert (await rerank(core, QUERY, TEXTS)).usage.cached_pairs == 0


async def test_metrics_count_hits_misses_and_size(tiny_bert: Path):
    async with serving_core(tiny_bert) as core:

        def sample(name: str) -> float | None:
            return core.metrics.registry.get_sample_value(name, {"model": tiny_bert.name})

        assert (sample("rerank_score_cache_hits_total"), sample("rerank_score_cache_misses_total")) == (0, 0)
        await rerank(core, QUERY, TEXTS)
        assert (sample("rerank_score_cache_misses_total"), sample("rerank_score_cache_pairs")) == (4, 4)
        await rerank(core, QUERY, [TEXTS[0], "a new document"])
        assert sample("rerank_score_cache_hits_total") == 1
        assert sample("rerank_score_cache_misses_total") == 5
        assert sample("rerank_score_cache_pairs") == 5
        info = core.info().ranking.score_cache
        assert (info.serves, info.max_pairs, info.pairs, info.why_not_serving) == (True, 1000, 5, "")


def test_a_key_is_a_digest_of_fixed_size_whatever_the_text(core: ServingCore):
    reranker = reranker_of(core)
    spec = reranker.check_query(QUERY, RerankOptions())
    texts = [TEXTS[2], TEXTS[2] * 200, TEXTS[2].upper()]
    keys = reranker.scorer.score_cache.keys(reranker.model, reranker.batcher.engine, QUERY, spec, texts)
    assert [len(key) for key in keys] == [16, 16, 16]
    assert len(set(keys)) == 3
