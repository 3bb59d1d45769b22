"""Server lifecycle: listen first, load and warm the model, serve, drain on a signal."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rerank.v1 import rerank_pb2, rerank_pb2_grpc
from sidecar import __version__
from sidecar.errors import ModelLoadError, NotReady
from sidecar.runtime import Runtime, load_runtime
from sidecar.scheduling.batcher import Batcher, BatchLimits
from sidecar.scheduling.reranker import Document, Limits, Reranker, RerankOptions
from sidecar.scheduling.scoring import scorer_for
from sidecar.settings import Settings
from sidecar.transport.interceptors import ErrorMappingInterceptor
from sidecar.transport.servicer import RerankerServicer

logger = logging.getLogger(__name__)

RERANKER_SERVICE = rerank_pb2.DESCRIPTOR.services_by_name["Reranker"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_WARMUP_TEXT = "warm-up " * 512


class SidecarServer:
    """One gRPC server: the Reranker service, health and reflection.

    ``runtime_factory`` loads the model and engine; tests pass their own to wrap the engine.
    """

    def __init__(
        self, settings: Settings, runtime_factory: Callable[[Settings], Runtime] = load_runtime
    ) -> None:
        self.settings = settings
        self._runtime_factory = runtime_factory
        self.health = health.aio.HealthServicer()
        self.runtime: Runtime | None = None
        self.reranker: Reranker | None = None
        self._tokenizer_pool = ThreadPoolExecutor(settings.tokenizer_workers, thread_name_prefix="tokenize")
        self._server = grpc.aio.server(
            interceptors=[ErrorMappingInterceptor()],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.port = 0
        self._stopped = asyncio.Event()

    def _require_reranker(self) -> Reranker:
        if self.reranker is None or not self.reranker.accepting:
            raise NotReady("the server is not serving yet (the model is loading) or is shutting down")
        return self.reranker

    def info(self) -> rerank_pb2.InfoResponse:
        reranker = self._require_reranker()
        runtime = self.runtime
        assert runtime is not None
        model, engine = runtime.model, runtime.engine
        return rerank_pb2.InfoResponse(
            model_id=model.source.name,
            model_revision=model.revision,
            model_kind=model.kind.value,
            engine=engine.name,
            precision=engine.precision,
            device=engine.device,
            max_length=model.max_length,
            num_labels=model.num_labels,
            limits=rerank_pb2.BatchingLimits(
                max_batch_tokens=self.settings.max_batch_tokens,
                max_batch_pairs=self.settings.max_batch_pairs,
                max_queued_pairs=self.settings.max_queued_pairs,
                max_documents_per_request=reranker.limits.max_documents_per_request,
                max_chunks_per_doc=reranker.limits.max_chunks_per_doc,
            ),
            server_version=__version__,
            engine_notes=list(runtime.engine_notes),
        )

    async def start(self) -> None:
        """Listen, with every service NOT_SERVING until ``load`` completes."""
        rerank_pb2_grpc.add_RerankerServicer_to_server(
            RerankerServicer(self._require_reranker, self.info), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (RERANKER_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        for service in ("", RERANKER_SERVICE):
            await self.health.set(service, _NOT_SERVING)
        self.port = self._server.add_insecure_port(self.settings.address)
        if self.port == 0:
            raise OSError(f"could not listen on {self.settings.address}")
        await self._server.start()
        logger.info("listening on %s:%d", self.settings.host, self.port)

    async def load(self) -> None:
        """Load the model and engine off the event loop, warm them up, then report SERVING."""
        runtime = await asyncio.get_running_loop().run_in_executor(None, self._runtime_factory, self.settings)
        model = runtime.model
        if self.settings.max_batch_tokens < model.max_length:
            raise ModelLoadError(
                f"--max-batch-tokens {self.settings.max_batch_tokens} is below the model's max length "
                f"{model.max_length}: a single long pair would not fit a batch"
            )
        batcher = Batcher(
            runtime.engine,
            BatchLimits(
                self.settings.max_batch_tokens, self.settings.max_batch_pairs, self.settings.max_queued_pairs
            ),
            pad_token_id=model.pad_token_id,
            with_token_type_ids=model.uses_token_type_ids,
        )
        batcher.start()
        reranker = Reranker(
            scorer_for(model, batcher, self._tokenizer_pool),
            Limits(self.settings.max_documents_per_request, self.settings.max_chunks_per_doc),
        )
        # Warm up through the whole request path: one short pair and one batch of full-length pairs.
        full_batch = max(
            1, min(self.settings.max_batch_pairs, self.settings.max_batch_tokens // model.max_length)
        )
        await reranker.rerank("warm-up", [Document("", "warm-up")], RerankOptions(), None)
        await reranker.rerank("warm-up", [Document("", _WARMUP_TEXT)] * full_batch, RerankOptions(), None)
        self.runtime, self.reranker = runtime, reranker
        for service in ("", RERANKER_SERVICE):
            await self.health.set(service, _SERVING)
        logger.info("serving %s on port %d", model.source.name, self.port)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING, refuse new calls, let in-flight calls finish within the grace period."""
        if self._stopped.is_set():
            return
        grace = self.settings.grace_period if grace is None else grace
        logger.info("draining: in-flight calls get %.1f s", grace)
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)
        if self.reranker is not None:
            self.reranker.accepting = False
            await self.reranker.batcher.close()
        if self.runtime is not None:
            self.runtime.engine.close()
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
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
    return 0
