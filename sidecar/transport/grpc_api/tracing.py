"""Optional OpenTelemetry tracing of gRPC calls; nothing is imported unless an endpoint is configured."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

_configured = False


def configure_tracing(endpoint: str, service_name: str, exporter: Any = None) -> None:
    """Trace every gRPC call of servers created after this, exporting spans over OTLP to ``endpoint``.

    The instrumentation patches ``grpc.aio.server`` for the whole process, so it is installed once.
    ``exporter`` replaces the OTLP exporter (tests pass an in-memory one).
    """
    global _configured
    if _configured:
        return
    try:
        from opentelemetry import trace
        from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorServer
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:
        raise RuntimeError(
            "--otel-endpoint is set but OpenTelemetry is not installed; install the `tracing` extra "
            "(pip install 'rerank-sidecar[tracing]')"
        ) from exc
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    GrpcAioInstrumentorServer().instrument()
    _configured = True
    logger.info("tracing gRPC calls to %s", endpoint)
