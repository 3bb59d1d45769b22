"""The gRPC transport: the Reranker and Embedder services, health, reflection and the interceptors."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rerank.v1 import rerank_pb2, rerank_pb2_grpc
from sidecar.serving.core import ServingCore
from sidecar.settings import Settings
from sidecar.transport.calls import CallLedger
from sidecar.transport.grpc_api.interceptors import BearerTokenInterceptor, CallInterceptor
from sidecar.transport.grpc_api.servicer import EmbedderServicer, RerankerServicer

logger = logging.getLogger(__name__)

RERANKER_SERVICE = rerank_pb2.DESCRIPTOR.services_by_name["Reranker"].full_name
EMBEDDER_SERVICE = rerank_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files (mutual TLS with a client CA), or None for plaintext."""
    if not settings.tls_cert_file:
        return None
    key_and_chain = (Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes())
    client_ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [key_and_chain], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def security_of(settings: Settings) -> str:
    """How the transports are secured, for the start-up log line."""
    if not settings.tls_cert_file:
        return "plaintext"
    return "mutual TLS" if settings.tls_client_ca_file else "TLS"


class GrpcTransport:
    """One gRPC server in front of the serving core; every service is NOT_SERVING until the core serves."""

    def __init__(self, core: ServingCore, settings: Settings) -> None:
        self.core = core
        self._settings = settings
        self.health = health.aio.HealthServicer()
        self._services = (
            (RERANKER_SERVICE, EMBEDDER_SERVICE) if core.serves_embeddings else (RERANKER_SERVICE,)
        )
        self.calls = CallLedger(core.metrics)
        interceptors: list[grpc.aio.ServerInterceptor] = [
            CallInterceptor(self.calls, settings.max_message_bytes)
        ]
        if settings.auth_token:  # inside: a refused call is logged and measured like any other
            interceptors.append(BearerTokenInterceptor(settings.auth_token))
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                # Twice the limit: the interceptor refuses what lies between, with a log line and metrics.
                ("grpc.max_receive_message_length", 2 * settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
            ],
        )
        self.port = 0

    async def start(self) -> None:
        """Register the services and listen."""
        rerank_pb2_grpc.add_RerankerServicer_to_server(RerankerServicer(self.core), self._server)
        if EMBEDDER_SERVICE in self._services:
            rerank_pb2_grpc.add_EmbedderServicer_to_server(EmbedderServicer(self.core), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (*self._services, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        await self._set_health(_NOT_SERVING)
        credentials = server_credentials(self._settings)
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(self._settings.address)
            else:
                self.port = self._server.add_secure_port(self._settings.address, credentials)
        except RuntimeError:  # grpc's "Failed to bind"
            self.port = 0
        if self.port == 0:
            raise OSError(
                f"could not listen for gRPC on {self._settings.address}: the address is in use or not "
                "this host's; free it, or set --port (RERANK_PORT) or --host (RERANK_HOST)"
            )
        await self._server.start()

    async def serving(self) -> None:
        """Report every service SERVING: the core has loaded and warmed up its models."""
        await self._set_health(_SERVING)

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for service in ("", *self._services):
            await self.health.set(service, status)

    async def begin_draining(self) -> None:
        """Report NOT_SERVING, so probes and load balancers move on; the core refuses new calls."""
        await self.health.enter_graceful_shutdown()

    async def idle(self) -> None:
        """Return once no call of this server's own services is in flight."""
        await self.calls.idle()

    async def stop(self, grace: float) -> None:
        """Stop listening; calls still running after ``grace`` seconds are cancelled."""
        await self._server.stop(grace)
