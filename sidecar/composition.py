"""The composition root: the one place that builds the sidecar's parts and wires them together.

``Composition`` sets the process up (once, before anything loads), then builds the metrics, the
serving core, and the transports, each given the settings it uses. Once they listen, ``load_models``
loads each model with its engine, puts it behind a batcher and a scorer, warms it up, and hands the
core every model ready to serve. Torch's thread count is set where torch is first imported, in a cold
load (``serving.runtime``): a warm start never imports it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.errors import ModelLoadError
from sidecar.model.cache import key_digest, usable_cache_dir
from sidecar.model.engines import Engine
from sidecar.model.hardware import kernel_target
from sidecar.model.kinds import kind_of
from sidecar.model.loading import ModelSource
from sidecar.model.memory import HeapTrimmer, fix_mmap_threshold
from sidecar.model.tokenization import PairSpec, PairTokenizer
from sidecar.scheduling.batcher import Batcher, BatchLimits
from sidecar.scheduling.capacity import SharedCapacity
from sidecar.scheduling.tokenizer_pool import TokenizerPool, tokenizer_workers, tokenizes_in_processes
from sidecar.serving.core import ServedModel, ServedModels, ServingCore
from sidecar.serving.embedding import Embedder
from sidecar.serving.info import SelectionInfo
from sidecar.serving.metrics import Metrics
from sidecar.serving.reranking import Limits, Reranker
from sidecar.serving.runtime import (
    Runtime,
    SelectionProcess,
    calibration_unused_reason,
    clear_unused_cache,
    load_runtime,
)
from sidecar.serving.score_cache import ScoreCache
from sidecar.serving.scoring import Scorer
from sidecar.settings import Settings, model_entries
from sidecar.transport.grpc_api.server import GrpcTransport
from sidecar.transport.grpc_api.tracing import configure_tracing

if TYPE_CHECKING:
    from sidecar.transport.http_api.server import HttpTransport

logger = logging.getLogger(__name__)

# Loads a model and selects its engine; tests pass their own to wrap the engine.
RuntimeFactory = Callable[[Settings, ModelSource], Runtime]

_WARMUP_TEXT = "warm-up " * 512
# oneDNN's kernel cache, in kernels, unless the operator sets ONEDNN_PRIMITIVE_CACHE_CAPACITY.
ONEDNN_PRIMITIVE_CACHE_CAPACITY = 64
# Allocations from this size up get memory maps of their own (see fix_mmap_threshold): an engine's
# scratch buffers are larger, a batch's token arrays smaller.
MMAP_THRESHOLD = 1 << 20


def prepare_process(settings: Settings) -> Settings:
    """Process-wide set-up, done once before anything listens or loads; the settings as the rest of the
    process uses them (the cache directory one that can be written)."""
    # Checked before any library makes its own cache directory in it: one that cannot be written is a
    # warning, and a temporary directory stands in.
    cache_dir = usable_cache_dir(Path(settings.cache_dir).expanduser())
    # Requests are tokenized by the sidecar's own pool; the Rust tokenizer's thread pool would also take
    # every core for each request and preempt the engine's threads under concurrent callers (measured
    # with benchmarks/load.py). TorchInductor's compiled kernels go beside the other compiled
    # artifacts, on the mounted volume; it reads the variable once, so it is set before anything
    # compiles. oneDNN (inside OpenVINO and torch) keeps up to 1024 kernels for the shapes it met, about
    # 170 MB once traffic has brought that many; the engines keep their own per-shape caches in front of
    # it, so a small one costs nothing measurable (benchmarks/RESULTS.md, "Memory under varied
    # traffic"). It is read when oneDNN first runs. An operator's own settings win.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Per CPU (``kernel_target``), so a cache directory shared by machines of two CPU classes never
    # hands one the other's kernels.
    kernels_dir = cache_dir / "inductor" / key_digest(kernel_target())
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(kernels_dir))
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_PRIMITIVE_CACHE_CAPACITY))
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # glibc's own variable, read at the process's start
        fix_mmap_threshold(MMAP_THRESHOLD)
    if settings.otel_endpoint:
        configure_tracing(settings.otel_endpoint, "rerank-sidecar")
    if settings.calibration_file and (unused := calibration_unused_reason(settings)) is not None:
        logger.warning("--calibration-file %s is not used: %s", settings.calibration_file, unused)
    return dataclasses.replace(settings, cache_dir=str(cache_dir))


class Composition:
    """The parts of one sidecar process, built and wired, not yet listening or loaded."""

    def __init__(self, settings: Settings, runtime_factory: RuntimeFactory | None = None) -> None:
        self.settings = prepare_process(settings)
        self.metrics = Metrics()
        self.core = ServingCore(self.settings, self.metrics)
        self.grpc = GrpcTransport(self.core, self.settings)
        self.http: HttpTransport | None = None
        if self.settings.http_port:
            # Imported only when HTTP serves: FastAPI and uvicorn add tens of MB to a process's memory.
            from sidecar.transport.http_api.server import HttpTransport

            self.http = HttpTransport(self.core, self.settings)
        self._runtime_factory = runtime_factory

    async def load_models(self) -> None:
        """Load, gate and warm up every model, then hand them to the core, which serves from then on;
        then clear the cache of what no start has used for ``--cache-retention-days``: after this start
        marked what it uses, and without delaying SERVING."""
        self.core.serve(await ModelAssembly(self.settings, self.metrics, self._runtime_factory).build())
        settings = self.settings
        await asyncio.to_thread(clear_unused_cache, Path(settings.cache_dir), settings.cache_retention_days)


def _named_sources(flag: str, value: str, revision: str) -> dict[str, ModelSource]:
    """Where each model of ``flag`` comes from, by name, in the order given: checked before any loads."""
    sources: dict[str, ModelSource] = {}
    for entry in model_entries(flag, value):
        source = ModelSource.resolve(entry.reference, revision)
        name = entry.name or source.model_id
        if name in sources:
            raise ModelLoadError(
                f"{flag}: two models are named {name!r}; give each its own name as NAME=PATH_OR_ID"
            )
        sources[name] = source
    return sources


class ModelAssembly:
    """Builds the served models: a runtime (model and engine) per model, each behind its batcher and
    scorer, warmed up; the Reranker and Embedder over them; and the tokenizer pool they share.

    Without a ``runtime_factory``, ``load_runtime`` loads each model, and the models of a first start
    share one child process for their engine selection, which exits once every model is loaded."""

    def __init__(
        self, settings: Settings, metrics: Metrics, runtime_factory: RuntimeFactory | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._selection_process = SelectionProcess()
        self._runtime_factory = runtime_factory or functools.partial(
            load_runtime, selection_process=self._selection_process
        )
        self._tokenizer_pool = TokenizerPool(tokenizer_workers(settings.tokenizer_workers))
        self._heap_trimmer = HeapTrimmer(settings.heap_trim_interval)
        self._built: list[ServedModel] = []
        self._by_source: dict[ModelSource, ServedModel] = {}
        # The batch workers and queue limit every model's batcher shares.
        self._capacity = SharedCapacity(1)

    async def build(self) -> ServedModels:
        """Every model ready to serve; what was built is released again when a model fails to load."""
        try:
            models = await self._build()
        except BaseException:
            # First: a selection still running is for a model nobody waits for any more.
            self._selection_process.close()
            for served in self._built:
                await served.batcher.close()
            await self._tokenizer_pool.close()
            raise
        self._selection_process.close()
        return models

    async def _build(self) -> ServedModels:
        settings = self.settings
        limits = Limits(
            settings.max_documents_per_request, settings.max_chunks_per_doc, settings.max_request_tokens
        )
        ranking_sources = _named_sources("--model", settings.model, settings.revision)
        embedding_sources = _named_sources("--embed-model", settings.embed_model, "")
        for name in ranking_sources.keys() & embedding_sources.keys():
            if ranking_sources[name] != embedding_sources[name]:
                raise ModelLoadError(
                    f"--model and --embed-model name two models {name!r}; the metrics and logs tell "
                    "models apart by name: give each its own as NAME=PATH_OR_ID"
                )
        ranking = await self._serve_named(ranking_sources)
        embedding = await self._serve_named(embedding_sources)
        embedders = {}
        for name, served in embedding.items():
            embed_model = kind_of(served.model).embedding_model(served.model)
            if embed_model is None:
                raise ModelLoadError(
                    f"--embed-model {name} is not an embedding model: it needs the sentence-transformers "
                    "layout (modules.json with a Pooling module)"
                )
            embedders[name] = Embedder(
                embed_model,
                served.batcher,
                self._tokenizer_pool,
                max_texts=settings.max_documents_per_request,
                max_request_tokens=settings.max_request_tokens,
                name=name,
                label=served.name,
            )
        rerankers = {
            name: Reranker(served.scorer, limits, name=name, label=served.name)
            for name, served in ranking.items()
        }
        return ServedModels(
            ranking, rerankers, embedding, embedders, self._tokenizer_pool, self._heap_trimmer
        )

    async def _serve_named(self, sources: dict[str, ModelSource]) -> dict[str, ServedModel]:
        """The models by name, in the order given; a model already served (under another name, or by
        the other service) is served once."""
        served: dict[str, ServedModel] = {}
        for name, source in sources.items():
            same = self._by_source.get(source)
            served[name] = same if same is not None else await self._serve_model(source, name)
            self._by_source[source] = served[name]
        return served

    async def _serve_model(self, source: ModelSource, name: str) -> ServedModel:
        """Load a model and its engine off the event loop, start its batcher, and warm it up. The
        runtime hands its engine to the batcher, which holds it from then on."""
        runtime = await asyncio.get_running_loop().run_in_executor(
            None, self._runtime_factory, self.settings, source
        )
        model, engine = runtime.model, runtime.engine
        if runtime.max_batch_tokens < model.max_length:
            raise ModelLoadError(
                f"--max-batch-tokens {runtime.max_batch_tokens} is below the max length "
                f"{model.max_length} of {name}: a single long input would not fit a batch"
            )
        batcher = Batcher(
            engine,
            BatchLimits(runtime.max_batch_tokens, runtime.max_batch_pairs, self.settings.max_queued_pairs),
            pad_token_id=model.pad_token_id,
            with_token_type_ids=model.uses_token_type_ids,
            workers=runtime.batch_workers,
            on_batch=self._batch_observer(name),
            on_non_finite=self._non_finite_reporter(name),
            capacity=self._capacity,
            idle_release_s=self.settings.idle_release_after,
        )
        batcher.start()
        await self._start_tokenizer_pool(engine, model.tokenizer)
        selection = runtime.selection
        served = ServedModel(
            name,
            model,
            batcher,
            Scorer(model, batcher, self._tokenizer_pool, ScoreCache(self.settings.score_cache_size)),
            SelectionInfo(
                from_cache=selection.from_cache,
                lossy_margin=runtime.lossy_margin,
                speedup_over_lossless=selection.speedup_over_lossless,
                timings=dict(selection.timings),
                hardware=runtime.hardware,
            ),
            selection.notes,
            selection.upgrade,
        )
        self._built.append(served)
        self.metrics.watch_queue(name, lambda: batcher.queued_pairs, lambda: batcher.queued_pair_seconds)
        self.metrics.score_cache.watch(name, served.scorer.score_cache)
        self.metrics.describe_engine(name, engine.name, engine.precision, engine.device, model.kind.value)
        with runtime.phases.timed("warm-up"):
            await self._warm_up(served)
            # The gate's and the warm-up's full-length batches left each stream scratch memory sized for
            # them; the model's own traffic allocates what it needs.
            batcher.release_scratch_soon()
        logger.info(
            "%s ready on %s/%s in %.1f s: %s",
            name,
            engine.name,
            engine.precision,
            sum(runtime.phases.seconds.values()),
            runtime.phases.describe(),
        )
        return served

    async def _start_tokenizer_pool(self, engine: Engine, tokenizer: PairTokenizer) -> None:
        """Start the pool with the first model (whose device decides ``--tokenize-in auto``), and give its
        processes each model's tokenizer."""
        pool = self._tokenizer_pool
        if not pool.started:
            pool.use_processes(tokenizes_in_processes(self.settings.tokenize_in, engine.device))
            await pool.start()
            logger.info("tokenizing in %d %s", pool.workers, "processes" if pool.processes else "threads")
        await pool.share(tokenizer)

    def _batch_observer(self, model_id: str) -> Callable[[int, int], None]:
        """Counts each batch in the metrics, and tells the heap trimmer that memory may have been freed."""
        count = self.metrics.batch_observer(model_id)

        def observe(pairs: int, padded_tokens: int) -> None:
            count(pairs, padded_tokens)
            self._heap_trimmer.note_work()

        return observe

    def _non_finite_reporter(self, model_id: str) -> Callable[[Engine, int], None]:
        """Logs and counts each request failed for non-finite outputs (see NonFiniteOutput)."""

        def report(engine: Engine, rows: int) -> None:
            counted = f"{engine.name}/{engine.precision}"
            self.metrics.non_finite_requests.labels(model_id, counted).inc()
            logger.error(
                "%s on %s (%s) gave a non-finite output (NaN or infinity) for %d row(s) of a request; "
                "the request fails with an internal error and the engine keeps serving. If this repeats, "
                "restart with --reselect (or an empty --cache-dir) to rebuild and re-gate the engine",
                model_id,
                counted,
                engine.device,
                rows,
            )

        return report

    @staticmethod
    async def _warm_up(served: ServedModel) -> None:
        """Run one short input, then a full batch of full-length inputs, through the model's batcher."""
        model, limits = served.model, served.batcher.limits
        spec = PairSpec(max_length=model.max_length)
        full_batch = max(1, min(limits.max_batch_pairs, limits.max_batch_tokens // model.max_length))
        for texts in (["warm-up"], [_WARMUP_TEXT] * full_batch):
            encoded = await served.scorer.encode("warm-up", texts, spec)
            await served.batcher.score(encoded.rows, None)
