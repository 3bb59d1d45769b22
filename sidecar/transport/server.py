"""Server lifecycle: listen first, load and warm the model, serve, drain on a signal."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from rerank.v1 import rerank_pb2, rerank_pb2_grpc
from sidecar import __version__
from sidecar.errors import ModelLoadError, NotReady
from sidecar.model.engines import Engine
from sidecar.model.loading import BiEncoderModel, CrossEncoderModel, ModelSource
from sidecar.model.tokenization import PairSpec
from sidecar.runtime import Runtime, load_runtime
from sidecar.scheduling.batcher import Batcher, BatchLimits
from sidecar.scheduling.embedder import Embedder
from sidecar.scheduling.reranker import Limits, Reranker
from sidecar.scheduling.scoring import scorer_for
from sidecar.scheduling.tokenizer_pool import TokenizerPool
from sidecar.settings import Settings
from sidecar.transport.interceptors import BearerTokenInterceptor, CallInterceptor
from sidecar.transport.metrics import Metrics
from sidecar.transport.servicer import EmbedderServicer, RerankerServicer
from sidecar.transport.tracing import configure_tracing

logger = logging.getLogger(__name__)

RERANKER_SERVICE = rerank_pb2.DESCRIPTOR.services_by_name["Reranker"].full_name
EMBEDDER_SERVICE = rerank_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_WARMUP_TEXT = "warm-up " * 512


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files (mutual TLS with a client CA), or None for plaintext."""
    if not settings.tls_cert_file:
        return None
    key_and_chain = (Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes())
    client_ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [key_and_chain], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


@dataclass(frozen=True)
class ServedModel:
    runtime: Runtime
    batcher: Batcher

    @property
    def engine(self) -> Engine:
        """The engine serving now: the one chosen at start, or the compiled one that took over."""
        return self.batcher.engine


def selection_info(runtime: Runtime) -> rerank_pb2.EngineSelection:
    selection = runtime.selection
    return rerank_pb2.EngineSelection(
        from_cache=selection.from_cache,
        lossy_margin=runtime.lossy_margin,
        speedup_over_lossless=selection.speedup_over_lossless,
        timings=[
            rerank_pb2.CandidateTiming(candidate=candidate, rows_per_second=speed)
            for candidate, speed in selection.timings.items()
        ],
        hardware=runtime.hardware,
    )


class SidecarServer:
    """One gRPC server: the Reranker service, the Embedder when an embedding model is set, health and
    reflection.

    ``runtime_factory`` loads a model and its engine; tests pass their own to wrap the engine.
    """

    def __init__(
        self, settings: Settings, runtime_factory: Callable[[Settings, ModelSource], Runtime] = load_runtime
    ) -> None:
        self.settings = settings
        self._runtime_factory = runtime_factory
        self.health = health.aio.HealthServicer()
        self.ranking: ServedModel | None = None
        self.embedding: ServedModel | None = None
        self.reranker: Reranker | None = None
        self.embedder: Embedder | None = None
        self._served: list[ServedModel] = []
        self._services = (RERANKER_SERVICE, EMBEDDER_SERVICE) if settings.embed_model else (RERANKER_SERVICE,)
        self._tokenizer_pool = TokenizerPool(settings.tokenizer_workers)
        # Requests are tokenized by that pool; the Rust tokenizer's own thread pool would also take
        # every core for each request, preempting the engine's threads under concurrent callers
        # (measured: 16 callers 0.87x of one caller with it, 1.03x without). An operator's setting wins.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.metrics = Metrics()
        self._metrics_http: Any = None
        if settings.otel_endpoint:
            configure_tracing(settings.otel_endpoint, "rerank-sidecar")
        self._calls = CallInterceptor(self.metrics)
        self._draining = False
        interceptors: list[grpc.aio.ServerInterceptor] = [self._calls]
        if settings.auth_token:
            interceptors.insert(0, BearerTokenInterceptor(settings.auth_token))
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
            ],
        )
        self.port = 0
        self.metrics_port = 0
        self._stopped = asyncio.Event()
        self._created = time.monotonic()
        self._compiling: threading.Thread | None = None

    def _check_serving(self) -> None:
        if self._draining:
            raise NotReady("this server is shutting down; retry on another replica")

    def _require_reranker(self) -> Reranker:
        self._check_serving()
        if self.reranker is None:
            raise NotReady("the model is still loading; wait until the health service reports SERVING")
        return self.reranker

    def _require_embedder(self) -> Embedder:
        self._check_serving()
        if self.embedder is None:
            raise NotReady("the model is still loading; wait until the health service reports SERVING")
        return self.embedder

    def info(self) -> rerank_pb2.InfoResponse:
        reranker = self._require_reranker()
        ranking = self.ranking
        assert ranking is not None
        runtime = ranking.runtime
        model, engine = runtime.model, ranking.engine
        response = rerank_pb2.InfoResponse(
            model_id=model.source.model_id,
            model_revision=model.revision,
            model_kind=model.kind.value,
            engine=engine.name,
            precision=engine.precision,
            device=engine.device,
            max_length=model.max_length,
            num_labels=model.num_labels if isinstance(model, CrossEncoderModel) else 0,
            limits=rerank_pb2.BatchingLimits(
                max_batch_tokens=runtime.max_batch_tokens,
                batch_workers=runtime.batch_workers,
                max_batch_pairs=self.settings.max_batch_pairs,
                max_queued_pairs=self.settings.max_queued_pairs,
                max_documents_per_request=reranker.limits.max_documents_per_request,
                max_chunks_per_doc=reranker.limits.max_chunks_per_doc,
            ),
            server_version=__version__,
            engine_notes=list(runtime.selection.notes),
            compiled=engine.compiled,
            selection=selection_info(runtime),
            model_family=model.family,
            instruction=getattr(model.tokenizer, "instruction", ""),
        )
        if self.embedder is not None and self.embedding is not None:
            embedding = self.embedding
            embed_model, embed_engine = self.embedder.model, embedding.engine
            response.embedding_model.CopyFrom(
                rerank_pb2.EmbeddingModelInfo(
                    model_id=embed_model.source.model_id,
                    dims=embed_model.dims,
                    pooling=embed_model.pooling.mode,
                    normalized=embed_model.pooling.normalize,
                    max_length=embed_model.max_length,
                    engine=embed_engine.name,
                    precision=embed_engine.precision,
                    device=embed_engine.device,
                    compiled=embed_engine.compiled,
                    selection=selection_info(embedding.runtime),
                )
            )
        return response

    async def start(self) -> None:
        """Listen, with every service NOT_SERVING until ``load`` completes."""
        rerank_pb2_grpc.add_RerankerServicer_to_server(
            RerankerServicer(self._require_reranker, self.info), self._server
        )
        if EMBEDDER_SERVICE in self._services:
            rerank_pb2_grpc.add_EmbedderServicer_to_server(
                EmbedderServicer(self._require_embedder), self._server
            )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (*self._services, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        for service in ("", *self._services):
            await self.health.set(service, _NOT_SERVING)
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.port = self._server.add_insecure_port(self.settings.address)
        else:
            self.port = self._server.add_secure_port(self.settings.address, credentials)
        if self.port == 0:
            raise OSError(f"could not listen on {self.settings.address}")
        await self._server.start()
        if self.settings.metrics_port:
            self._metrics_http, _ = start_http_server(
                self.settings.metrics_port, addr=self.settings.host, registry=self.metrics.registry
            )
            self.metrics_port = self._metrics_http.server_port
        logger.info(
            "listening on %s:%d (%s)%s",
            self.settings.host,
            self.port,
            "plaintext"
            if credentials is None
            else "mutual TLS"
            if self.settings.tls_client_ca_file
            else "TLS",
            f", metrics on port {self.metrics_port}" if self.metrics_port else "",
        )

    async def _serve_model(self, source: ModelSource) -> ServedModel:
        """Load a model and its engine off the event loop, and start its batcher."""
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
            BatchLimits(
                runtime.max_batch_tokens, self.settings.max_batch_pairs, self.settings.max_queued_pairs
            ),
            pad_token_id=model.pad_token_id,
            with_token_type_ids=model.uses_token_type_ids,
            workers=runtime.batch_workers,
            on_batch=self.metrics.batch_observer(source.model_id),
        )
        batcher.start()
        self.metrics.watch_queue(source.model_id, lambda: batcher.queued_pairs)
        engine = runtime.engine
        self.metrics.describe_engine(
            source.model_id, engine.name, engine.precision, engine.device, model.kind.value
        )
        served = ServedModel(runtime, batcher)
        self._served.append(served)
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

    def _upgrade_in_background(self) -> None:
        """Compile the serving engines off the event loop (--torch-compile auto), one model after the
        other, and let each compiled engine take over once it passes the gate. A daemon thread: a stop
        never waits for a compile."""
        upgrades = [(served, served.runtime.selection.upgrade) for served in self._served]
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
                if self._draining:
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

    async def _warm_up(self, served: ServedModel) -> None:
        """Run one short input, then a full batch of full-length inputs, through the model's batcher."""
        model = served.runtime.model
        spec = PairSpec(max_length=model.max_length)
        full_batch = max(
            1, min(self.settings.max_batch_pairs, served.runtime.max_batch_tokens // model.max_length)
        )
        for texts in (["warm-up"], [_WARMUP_TEXT] * full_batch):
            if isinstance(model, BiEncoderModel):
                encoded = model.tokenizer.encode_texts(texts, spec)
            else:
                encoded = model.tokenizer.encode("warm-up", texts, spec)
            await served.batcher.score(encoded.pairs, None)

    async def load(self) -> None:
        """Load the models and engines, warm them up, then report SERVING."""
        rerank_source = ModelSource.resolve(self.settings.model, self.settings.revision)
        ranking = await self._serve_model(rerank_source)
        reranker = Reranker(
            scorer_for(ranking.runtime.model, ranking.batcher, self._tokenizer_pool),
            Limits(
                self.settings.max_documents_per_request,
                self.settings.max_chunks_per_doc,
                self.settings.max_request_tokens,
            ),
        )

        embedder, embedding = None, None
        if self.settings.embed_model:
            embed_source = ModelSource.resolve(self.settings.embed_model)
            same_model = embed_source == rerank_source and isinstance(ranking.runtime.model, BiEncoderModel)
            embedding = ranking if same_model else await self._serve_model(embed_source)
            if not isinstance(embedding.runtime.model, BiEncoderModel):
                raise ModelLoadError(
                    f"--embed-model {self.settings.embed_model} is not an embedding model: it needs the "
                    "sentence-transformers layout (modules.json with a Pooling module)"
                )
            embedder = Embedder(
                embedding.runtime.model,
                embedding.batcher,
                self._tokenizer_pool,
                max_texts=self.settings.max_documents_per_request,
                max_request_tokens=self.settings.max_request_tokens,
            )

        self.ranking, self.reranker, self.embedding, self.embedder = ranking, reranker, embedding, embedder
        for service in ("", *self._services):
            await self.health.set(service, _SERVING)
        self._upgrade_in_background()
        logger.info(
            "serving %s (%s)%s on port %d, %.1f s after the server started",
            rerank_source.model_id,
            reranker.model.kind.value,
            f" and embeddings from {embedder.model.source.model_id}" if embedder else "",
            self.port,
            time.monotonic() - self._created,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING, refuse new calls, let in-flight calls finish within the grace period."""
        if self._stopped.is_set():
            return
        grace = self.settings.grace_period if grace is None else grace
        logger.info("draining: in-flight calls get %.1f s", grace)
        # New calls get UNAVAILABLE, which clients retry on another replica, while the calls in flight
        # finish; only then does gRPC stop the listener (it cancels calls that arrive as it stops).
        self._draining = True
        await self.health.enter_graceful_shutdown()
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._calls.idle(), timeout=grace)
        except TimeoutError:
            logger.warning(
                "%d call(s) still in flight after the grace period; cancelling them", self._calls.in_flight
            )
        await self._server.stop(max(0.0, grace - (time.monotonic() - started)))
        for served in self._served:
            await served.batcher.close()
            served.engine.close()
            if served.runtime.engine is not served.engine:
                served.runtime.engine.close()
        self._tokenizer_pool.shutdown()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._stopped.set()
        logger.info("stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code."""
    server = SidecarServer(settings)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    await server.start()
    loading = asyncio.create_task(server.load())
    stopping = asyncio.create_task(stop_requested.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is not None:
        stopping.cancel()
        logger.error("%s", loading.exception())
        await server.stop(grace=0)
        return 1
    await stopping
    if not loading.done():
        loading.cancel()
    await server.stop()
    if server.compiling:
        # Interpreter shutdown would tear down the compiling thread's native state under it and abort
        # the process; the server has drained and stopped, so leave at once with its exit code.
        logger.info("exiting without waiting for the background compile")
        logging.shutdown()
        os._exit(0)
    return 0
