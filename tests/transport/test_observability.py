"""Prometheus metrics, OpenTelemetry tracing, and the size limits' statuses."""

from __future__ import annotations

import logging
import urllib.request
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from client.local_sidecar import free_port
from rerank.v1 import rerank_pb2
from sidecar.transport.grpc_api import tracing
from tests.conftest import docs, running_sidecar, wait_until


async def test_metrics_endpoint_reports_calls_queue_batches_stages_and_engine(tiny_bert: Path):
    async with running_sidecar(tiny_bert, metrics_port=0) as running:
        assert running.server.metrics_port == 0  # 0 disables the endpoint
    async with running_sidecar(tiny_bert, metrics_port=free_port()) as running:
        await running.stub.Rerank(
            rerank_pb2.RerankRequest(query="q", documents=docs("a", "b", "c")), timeout=10
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await running.stub.Rerank(rerank_pb2.RerankRequest(query="", documents=docs("a")), timeout=10)
        url = f"http://127.0.0.1:{running.server.metrics_port}/metrics"
        model = tiny_bert.name  # the directory's name: metrics never show a path on the host
        rerank = f'method="/rerank.v1.Reranker/Rerank",model="{model}"'
        refused = f'rerank_requests_total{{code="INVALID_ARGUMENT",{rerank}}} 1.0'

        def scrape() -> str:
            return urllib.request.urlopen(url, timeout=10).read().decode()

        # A refused call is counted just after its status goes out (the abort sends it), so wait for it.
        await wait_until(lambda: refused in scrape())
        body = scrape()
    assert f'rerank_requests_total{{code="OK",{rerank}}} 1.0' in body
    assert f'rerank_requests_total{{code="INVALID_ARGUMENT",{rerank}}} 1.0' in body
    assert f'rerank_queued_pairs{{model="{model}"}} 0.0' in body
    assert f'rerank_batch_pairs_count{{model="{model}"}}' in body
    assert f'rerank_batch_tokens_bucket{{le="64.0",model="{model}"}}' in body
    for stage in ("queue", "tokenization", "inference", "total"):
        method = "/rerank.v1.Reranker/Rerank"
        assert f'rerank_stage_seconds_count{{method="{method}",model="{model}",stage="{stage}"}}' in body
    assert (
        f'rerank_engine_info{{device="cpu",engine="torch",kind="cross-encoder",model="{model}",precision="fp32"}}'
        in body
    )


async def test_calls_are_traced_when_an_endpoint_is_set(tiny_bert: Path, monkeypatch):
    exporter = InMemorySpanExporter()
    monkeypatch.setattr(tracing, "_configured", False)
    tracing.configure_tracing("http://collector.invalid:4317", "rerank-sidecar", exporter=exporter)
    try:
        async with running_sidecar(tiny_bert, otel_endpoint="http://collector.invalid:4317") as running:
            await running.stub.Rerank(rerank_pb2.RerankRequest(query="q", documents=docs("a")), timeout=10)
    finally:
        from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorServer

        GrpcAioInstrumentorServer().uninstrument()
    names = [span.name for span in exporter.get_finished_spans()]
    assert "/rerank.v1.Reranker/Rerank" in names


async def test_token_limit_is_invalid_argument(tiny_bert: Path):
    async with running_sidecar(tiny_bert, max_request_tokens=50) as running:
        ok = await running.stub.Rerank(
            rerank_pb2.RerankRequest(query="q", documents=docs("short")), timeout=10
        )
        assert len(ok.results) == 1
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await running.stub.Rerank(
                rerank_pb2.RerankRequest(query="q", documents=docs(*["a longer passage of text"] * 10)),
                timeout=10,
            )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "over the limit of 50" in raised.value.details()
    assert "--max-request-tokens" in raised.value.details()


async def test_message_size_limit_is_resource_exhausted_logged_and_counted(
    tiny_bert: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="sidecar.access")
    async with running_sidecar(tiny_bert, max_message_bytes=10_000) as running:
        with pytest.raises(grpc.aio.AioRpcError) as asked:
            await running.stub.Rerank(
                rerank_pb2.RerankRequest(query="q", documents=docs("x" * 15_000)), timeout=10
            )
        # Under the limit asking, over it answering: each result adds its index and score to its text.
        unnamed = [rerank_pb2.Document(text="cat")] * 900
        echoed = rerank_pb2.RerankRequest(query="q", documents=unnamed, return_text=True)
        assert echoed.ByteSize() < 10_000
        with pytest.raises(grpc.aio.AioRpcError) as answered:
            await running.stub.Rerank(echoed, timeout=10)
        registry = running.server.core.metrics.registry
        labels = {"method": "/rerank.v1.Reranker/Rerank", "code": "RESOURCE_EXHAUSTED"}
        await wait_until(
            lambda: (registry.get_sample_value("rerank_requests_total", {**labels, "model": ""}) or 0) == 1
        )
        counted_answers = registry.get_sample_value(
            "rerank_requests_total", {**labels, "model": tiny_bert.name}
        )
    assert asked.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over the limit of 10000 (--max-message-bytes)" in asked.value.details()
    assert answered.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the answer has" in answered.value.details()
    assert counted_answers == 1  # not counted OK, as it was when gRPC refused to send it
    statuses = [record.fields["status"] for record in caplog.records if record.name == "sidecar.access"]  # type: ignore[attr-defined]
    assert statuses.count("RESOURCE_EXHAUSTED") == 2
    assert "OK" not in statuses
