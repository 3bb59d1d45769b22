"""The process: the serving core behind its transports, from listening to a drained stop.

Listen first (every service NOT_SERVING), load and warm the models, report SERVING, and on SIGTERM or
SIGINT drain: refuse new calls, let the calls in flight finish within the grace period, stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import start_http_server

from sidecar.composition import Composition, RuntimeFactory
from sidecar.errors import ModelLoadError
from sidecar.settings import Settings
from sidecar.transport.grpc_api.server import GrpcTransport, security_of

if TYPE_CHECKING:
    from sidecar.transport.http_api.server import HttpTransport

logger = logging.getLogger(__name__)


class SidecarServer:
    """The lifecycle of the parts the composition root builds: the serving core, the gRPC transport
    and (with --http-port) the HTTP transport in front of it, and the metrics endpoint.

    ``runtime_factory`` loads a model and its engine; tests pass their own to wrap the engine. Without
    one, ``load_runtime`` loads each model, the first starts selecting in one child process.
    """

    def __init__(self, settings: Settings, runtime_factory: RuntimeFactory | None = None) -> None:
        self._composition = Composition(settings, runtime_factory)
        self.settings = self._composition.settings
        self.core = self._composition.core
        self.grpc = self._composition.grpc
        self.http = self._composition.http
        self._metrics_http: Any = None
        self.metrics_port = 0
        self._stopped = asyncio.Event()

    @property
    def port(self) -> int:
        return self.grpc.port

    async def start(self) -> None:
        """Listen, with every service NOT_SERVING until ``load`` completes. Raises OSError, saying which
        port, where one cannot be listened on; what had started stops again."""
        started: list[GrpcTransport | HttpTransport] = []
        try:
            for transport in (self.grpc, self.http):
                if transport is not None:
                    await transport.start()
                    started.append(transport)
            if self.settings.metrics_port:
                self._metrics_http = self._start_metrics()
                self.metrics_port = self._metrics_http.server_port
        except OSError:
            await asyncio.gather(*(transport.stop(0) for transport in started))
            raise
        logger.info(
            "listening on %s:%d (%s)%s%s",
            self.settings.host,
            self.port,
            security_of(self.settings),
            f", HTTP on port {self.http.port}" if self.http is not None else "",
            f", metrics on port {self.metrics_port}" if self.metrics_port else "",
        )

    def _start_metrics(self) -> Any:
        address = f"{self.settings.host}:{self.settings.metrics_port}"
        try:
            server, _ = start_http_server(
                self.settings.metrics_port, addr=self.settings.host, registry=self.core.metrics.registry
            )
        except OSError as error:
            raise OSError(
                f"could not listen for metrics on {address}: {error.strerror}; free it, or set "
                "--metrics-port (RERANK_METRICS_PORT; 0 turns the endpoint off)"
            ) from error
        return server

    async def load(self) -> None:
        """Load the models and engines, warm them up, then report SERVING."""
        await self._composition.load_models()
        await self.grpc.serving()

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING, refuse new calls, let in-flight calls finish within the grace period."""
        if self._stopped.is_set():
            return
        grace = self.settings.grace_period if grace is None else grace
        logger.info("draining: in-flight calls get %.1f s", grace)
        # New calls get UNAVAILABLE (503 over HTTP), which clients retry on another replica, while the
        # calls in flight finish; only then do the transports stop listening (gRPC cancels calls that
        # arrive as it stops).
        self.core.begin_draining()
        await self.grpc.begin_draining()
        transports: list[GrpcTransport | HttpTransport] = [self.grpc]
        if self.http is not None:
            transports.append(self.http)
        started = time.monotonic()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(transport.idle() for transport in transports)), timeout=grace
            )
        except TimeoutError:
            in_flight = sum(transport.calls.in_flight for transport in transports)
            if in_flight:  # a stop with no grace (a failed start) times out with nothing to cancel
                logger.warning(
                    "%d call(s) still in flight after the grace period; cancelling them", in_flight
                )
        remaining = max(0.0, grace - (time.monotonic() - started))
        await asyncio.gather(*(transport.stop(remaining) for transport in transports))
        await self.core.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._stopped.set()
        logger.info("stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code."""
    try:
        server = SidecarServer(settings)
    except (OSError, ModelLoadError) as error:  # the process's set-up: its cache, its threads
        logger.error("%s", error)
        return 1
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    try:
        await server.start()
    except OSError as error:
        logger.error("%s", error)
        return 1
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
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
    if server.core.compiling:
        # Interpreter shutdown would tear down the compiling thread's native state under it and abort
        # the process; the server has drained and stopped, so leave at once with its exit code.
        logger.info("exiting without waiting for the background compile")
        logging.shutdown()
        os._exit(0)
    return 0
