"""The HTTP transport: a uvicorn server on the running event loop, in front of the same serving core
(and so the same batcher, queue and limits) as gRPC."""

from __future__ import annotations

import asyncio
import ssl

import uvicorn

from sidecar.serving.core import ServingCore
from sidecar.settings import Settings
from sidecar.transport.calls import CallLedger
from sidecar.transport.http_api.middleware import CallMiddleware
from sidecar.transport.http_api.routes import CALL_PATHS, build_app


class HttpTransport:
    """Listens on --http-port with the --tls-* settings gRPC uses; health reads the core's state."""

    def __init__(self, core: ServingCore, settings: Settings) -> None:
        self.calls = CallLedger(core.metrics)
        app = CallMiddleware(
            build_app(core, settings),
            self.calls,
            call_paths=CALL_PATHS,
            auth_token=settings.auth_token,
            max_body_bytes=settings.max_message_bytes,
        )
        self._config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.http_port,
            lifespan="off",
            log_config=None,  # the sidecar's own logging, and its own access log line per call
            access_log=False,
            server_header=False,
            ssl_certfile=settings.tls_cert_file or None,
            ssl_keyfile=settings.tls_key_file or None,
            ssl_ca_certs=settings.tls_client_ca_file or None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if settings.tls_client_ca_file else ssl.CERT_NONE,
        )
        self._server = uvicorn.Server(self._config)
        self._ticking: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        """Listen. Not ``Server.serve``: that takes over SIGTERM and SIGINT, which the sidecar drains on."""
        self._config.load()
        self._server.lifespan = self._config.lifespan_class(self._config)
        try:
            await self._server.startup()
        except SystemExit as exit_:  # uvicorn exits when it cannot bind
            raise OSError(
                f"could not listen for HTTP on {self._config.host}:{self._config.port}: the address is in "
                "use or not this host's; free it, or set --http-port (RERANK_HTTP_PORT)"
            ) from exit_
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        self._ticking = asyncio.create_task(self._server.main_loop())  # the Date header, until should_exit

    async def idle(self) -> None:
        """Return once no call is in flight."""
        await self.calls.idle()

    async def stop(self, grace: float) -> None:
        """Stop listening; calls still running after ``grace`` seconds are cancelled."""
        self._config.timeout_graceful_shutdown = max(grace, 0.1)  # 0 would wait forever
        self._server.should_exit = True
        if self._ticking is not None:
            await self._ticking
        await self._server.shutdown()
