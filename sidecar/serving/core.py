"""The serving core: loads the models, runs their batchers, and answers requests, free of any transport.

A transport (gRPC, HTTP/JSON) only converts its messages, asks the core for the ``Reranker`` or
``Embedder``, and maps ``SidecarError`` to its status codes. Tests and benchmarks can drive the core with
no server.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sidecar import __version__
from sidecar.errors import ModelLoadError, NotReady
from sidecar.model.engines import Engine
from sidecar.model.kinds import kind_of
from sidecar.model.loading import ModelSource
from sidecar.model.memory import HeapTrimmer
from sidecar.model.tokenization import PairSpec
from sidecar.scheduling.batcher import Batcher, BatchLimits
from sidecar.scheduling.tokenizer_pool import TokenizerPool, tokenizer_workers
from sidecar.serving.embedding import Embedder
from sidecar.serving.info import EmbeddingInfo, RankingInfo, SelectionInfo, ServingInfo
from sidecar.serving.metrics import Metrics
from sidecar.serving.reranking import Limits, Reranker
from sidecar.serving.runtime import Runtime, load_runtime
from sidecar.serving.scoring import Scorer
from sidecar.settings import Settings

logger = logging.getLogger(__name__)

_WARMUP_TEXT = "warm-up " * 512


class ServingState(enum.Enum):
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ServedModel:
    """One loaded model: its runtime, its batcher, and how it scores a query against documents."""

    runtime: Runtime
    batcher: Batcher
    scorer: Scorer

    @property
    def engine(self) -> Engine:
        """The engine serving now: the one chosen at start, or the compiled one that took over."""
        return self.batcher.engine


class ServingCore:
    """The Reranker, and the Embedder when an embedding model is set, with their lifecycle: ``load``
    (load, gate and warm up every model), ``begin_draining``, ``close``, and ``info``.

    ``runtime_factory`` loads a model and its engine; tests pass their own to wrap the engine.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        runtime_factory: Callable[[Settings, ModelSource], Runtime] = load_runtime,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._runtime_factory = runtime_factory
        self.state = ServingState.LOADING
        self.ranking: ServedModel | None = None
        self.embedding: ServedModel | None = None
        self.reranker: Reranker | None = None
        self.embedder: Embedder | None = None
        self.served: list[ServedModel] = []
        self._tokenizer_pool = TokenizerPool(tokenizer_workers(settings.tokenizer_workers))
        # Requests are tokenized by that pool; the Rust tokenizer's own thread pool would also take
        # every core for each request and preempt the engine's threads under concurrent callers
        # (measured with benchmarks/load.py). An operator's setting wins.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self._created = time.monotonic()
        self._compiling: threading.Thread | None = None
        self._heap_trimmer = HeapTrimmer(settings.heap_trim_interval)

    @property
    def serves_embeddings(self) -> bool:
        """Whether the Embedder is offered (an embedding model is set), loaded or not yet."""
        return bool(self.settings.embed_model)

    def require_reranker(self) -> Reranker:
        self._check_serving()
        if self.reranker is None:
            raise NotReady("the model is still loading; wait until the health service reports SERVING")
        return self.reranker

    def require_embedder(self) -> Embedder:
        self._check_serving()
        if self.embedder is None:
            raise NotReady("the model is still loading; wait until the health service reports SERVING")
        return self.embedder

    def _check_serving(self) -> None:
        if self.state in (ServingState.DRAINING, ServingState.STOPPED):
            raise NotReady("this server is shutting down; retry on another replica")

    async def load(self) -> None:
        """Load the models and engines and warm them up; the core serves once this returns."""
        rerank_source = ModelSource.resolve(self.settings.model, self.settings.revision)
        ranking = await self._serve_model(rerank_source)
        reranker = Reranker(
            ranking.scorer,
            Limits(
                self.settings.max_documents_per_request,
                self.settings.max_chunks_per_doc,
                self.settings.max_request_tokens,
            ),
        )
        embedder, embedding = None, None
        if self.settings.embed_model:
            embed_source = ModelSource.resolve(self.settings.embed_model)
            same_model = embed_source == rerank_source and kind_of(ranking.runtime.model).embeds
            embedding = ranking if same_model else await self._serve_model(embed_source)
            embed_model = kind_of(embedding.runtime.model).embedding_model(embedding.runtime.model)
            if embed_model is None:
                raise ModelLoadError(
                    f"--embed-model {self.settings.embed_model} is not an embedding model: it needs the "
                    "sentence-transformers layout (modules.json with a Pooling module)"
                )
            embedder = Embedder(
                embed_model,
                embedding.batcher,
                self._tokenizer_pool,
                max_texts=self.settings.max_documents_per_request,
                max_request_tokens=self.settings.max_request_tokens,
            )
        self.ranking, self.reranker, self.embedding, self.embedder = ranking, reranker, embedding, embedder
        self.state = ServingState.SERVING
        self._heap_trimmer.start()
        self._upgrade_in_background()
        logger.info(
            "serving %s (%s)%s, %.1f s after the server started",
            rerank_source.model_id,
            ranking.runtime.model.kind.value,
            f" and embeddings from {embedding.runtime.model.source.model_id}" if embedding else "",
            time.monotonic() - self._created,
        )

    async def _serve_model(self, source: ModelSource) -> ServedModel:
        """Load a model and its engine off the event loop, start its batcher, and warm it up."""
        runtime = await asyncio.get_running_loop().run_in_executor(
            None, self._runtime_factory, self.settings, source
        )
        model = runtime.model
        if runtime.max_batch_tokens < model.max_length:
            raise ModelLoadError(
                f"--max-batch-tokens {runtime.max_batch_tokens} is below the max length "
                f"{model.max_length} of {source.model_id}: a single long input would not fit a batch"
            )
        batcher = Batcher(
            runtime.engine,
            BatchLimits(runtime.max_batch_tokens, runtime.max_batch_pairs, self.settings.max_queued_pairs),
            pad_token_id=model.pad_token_id,
            with_token_type_ids=model.uses_token_type_ids,
            workers=runtime.batch_workers,
            on_batch=self._batch_observer(source.model_id),
            on_non_finite=self._non_finite_reporter(source.model_id),
        )
        batcher.start()
        self.metrics.watch_queue(
            source.model_id, lambda: batcher.queued_pairs, lambda: batcher.queued_pair_seconds
        )
        engine = runtime.engine
        self.metrics.describe_engine(
            source.model_id, engine.name, engine.precision, engine.device, model.kind.value
        )
        served = ServedModel(runtime, batcher, Scorer(model, batcher, self._tokenizer_pool))
        self.served.append(served)
        with runtime.phases.timed("warm-up"):
            await self._warm_up(served)
        logger.info(
            "%s ready on %s/%s in %.1f s: %s",
            source.model_id,
            engine.name,
            engine.precision,
            sum(runtime.phases.seconds.values()),
            runtime.phases.describe(),
        )
        return served

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

    async def _warm_up(self, served: ServedModel) -> None:
        """Run one short input, then a full batch of full-length inputs, through the model's batcher."""
        model = served.runtime.model
        spec = PairSpec(max_length=model.max_length)
        full_batch = max(
            1, min(served.runtime.max_batch_pairs, served.runtime.max_batch_tokens // model.max_length)
        )
        for texts in (["warm-up"], [_WARMUP_TEXT] * full_batch):
            encoded = await served.scorer.encode("warm-up", texts, spec)
            await served.batcher.score(encoded.rows, None)

    def _upgrade_in_background(self) -> None:
        """Compile the serving engines off the event loop (--torch-compile auto), one model after the
        other, and let each compiled engine take over once it passes the gate. A daemon thread: a stop
        never waits for a compile."""
        upgrades = [(served, served.runtime.selection.upgrade) for served in self.served]
        pending = [(served, upgrade) for served, upgrade in upgrades if upgrade is not None]
        if not pending:
            return

        def compile_and_swap() -> None:
            for served, upgrade in pending:
                model_id = served.runtime.model.source.model_id
                started = time.perf_counter()
                try:
                    upgraded = upgrade()
                except Exception:  # a failed upgrade must never take down the engine already serving
                    logger.exception("compiling %s in the background failed", model_id)
                    continue
                if self.state is not ServingState.SERVING:
                    return
                if upgraded is None:
                    continue
                served.batcher.engine = upgraded[0]  # batches already running finish uncompiled
                logger.info(
                    "%s now serves compiled (%s/%s), after %.1f s of compiling in the background",
                    model_id,
                    upgraded[0].name,
                    upgraded[0].precision,
                    time.perf_counter() - started,
                )

        self._compiling = threading.Thread(target=compile_and_swap, name="compile", daemon=True)
        self._compiling.start()

    @property
    def compiling(self) -> bool:
        """Whether a background compile is still running (it cannot be interrupted)."""
        return self._compiling is not None and self._compiling.is_alive()

    def begin_draining(self) -> None:
        """Refuse new requests from now on; requests already admitted run to completion."""
        if self.state is not ServingState.STOPPED:
            self.state = ServingState.DRAINING

    async def close(self) -> None:
        """Fail whatever still waits, stop the batchers, and release the engines and threads."""
        self.state = ServingState.STOPPED
        self._heap_trimmer.stop()
        for served in self.served:
            await served.batcher.close()
            served.engine.close()
            if served.runtime.engine is not served.engine:
                served.runtime.engine.close()
        self._tokenizer_pool.shutdown()

    def info(self) -> ServingInfo:
        reranker = self.require_reranker()
        ranking = self.ranking
        assert ranking is not None
        runtime = ranking.runtime
        model, engine = runtime.model, ranking.engine
        embedding_info = None
        if self.embedder is not None and self.embedding is not None:
            embed_model, embed_engine = self.embedder.model, self.embedding.engine
            embedding_info = EmbeddingInfo(
                model_id=embed_model.source.model_id,
                dims=embed_model.dims,
                pooling=embed_model.pooling.mode,
                normalized=embed_model.pooling.normalize,
                max_length=embed_model.max_length,
                engine=embed_engine.name,
                precision=embed_engine.precision,
                device=embed_engine.device,
                compiled=embed_engine.compiled,
                selection=selection_info(self.embedding.runtime),
            )
        return ServingInfo(
            ranking=RankingInfo(
                model_id=model.source.model_id,
                model_revision=model.revision,
                model_kind=model.kind.value,
                engine=engine.name,
                precision=engine.precision,
                device=engine.device,
                max_length=model.max_length,
                num_labels=kind_of(model).num_labels(model),
                max_batch_tokens=runtime.max_batch_tokens,
                batch_workers=runtime.batch_workers,
                max_batch_pairs=runtime.max_batch_pairs,
                max_queued_pairs=self.settings.max_queued_pairs,
                max_documents_per_request=reranker.limits.max_documents_per_request,
                max_chunks_per_doc=reranker.limits.max_chunks_per_doc,
                engine_notes=tuple(runtime.selection.notes),
                compiled=engine.compiled,
                selection=selection_info(runtime),
                model_family=model.family,
                instruction=model.tokenizer.instruction,
            ),
            embedding=embedding_info,
            server_version=__version__,
        )


def selection_info(runtime: Runtime) -> SelectionInfo:
    selection = runtime.selection
    return SelectionInfo(
        from_cache=selection.from_cache,
        lossy_margin=runtime.lossy_margin,
        speedup_over_lossless=selection.speedup_over_lossless,
        timings=dict(selection.timings),
        hardware=runtime.hardware,
    )
