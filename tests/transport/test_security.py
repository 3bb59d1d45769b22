"""TLS, mutual TLS and the bearer token, with certificates made here."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rerank.v1 import rerank_pb2, rerank_pb2_grpc
from tests.conftest import docs, running_sidecar
from tests.pki import Pki

REQUEST = rerank_pb2.RerankRequest(query="q", documents=docs("a passage"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


async def call(port: int, credentials: grpc.ChannelCredentials | None, **kwargs) -> rerank_pb2.RerankResponse:
    target = f"localhost:{port}"
    channel = (
        grpc.aio.insecure_channel(target)
        if credentials is None
        else grpc.aio.secure_channel(target, credentials)
    )
    async with channel:
        return await rerank_pb2_grpc.RerankerStub(channel).Rerank(REQUEST, timeout=10, **kwargs)


async def test_tls_serves_tls_clients_and_refuses_plaintext(tiny_bert: Path, pki: Pki):
    tls = {"tls_cert_file": pki.file("server.pem"), "tls_key_file": pki.file("server-key.pem")}
    async with running_sidecar(tiny_bert, host="localhost", **tls) as running:
        response = await call(running.server.port, pki.channel_credentials(with_client_certificate=False))
        assert len(response.results) == 1
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(running.server.port, None)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_refuses_a_client_without_a_certificate(tiny_bert: Path, pki: Pki):
    mtls = {
        "tls_cert_file": pki.file("server.pem"),
        "tls_key_file": pki.file("server-key.pem"),
        "tls_client_ca_file": pki.file("ca.pem"),
    }
    async with running_sidecar(tiny_bert, host="localhost", **mtls) as running:
        response = await call(running.server.port, pki.channel_credentials(with_client_certificate=True))
        assert len(response.results) == 1
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(running.server.port, pki.channel_credentials(with_client_certificate=False))
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_bearer_token_is_required_but_health_stays_open(
    tiny_bert: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="sidecar.access")
    async with running_sidecar(tiny_bert, auth_token="s3cret") as running:
        port = running.server.port
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await call(port, None)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing bearer token" in missing.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await call(
                port, None, metadata=(("authorization", "Bearer guess"), ("x-request-id", "refused-1"))
            )
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "not valid" in wrong.value.details()
        # A refused call is answered, logged and measured as any other error is.
        assert ("x-request-id", "refused-1") in tuple(wrong.value.trailing_metadata() or ())
        stream = running.stub.RerankStream(iter([rerank_pb2.RerankStreamRequest(query="q")]), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            await stream.read()
        assert streamed.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reflection = reflection_pb2_grpc.ServerReflectionStub(running.channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        with pytest.raises(grpc.aio.AioRpcError) as reflected:
            await reflection.read()
        assert reflected.value.code() == grpc.StatusCode.UNAUTHENTICATED
        logged = [record.fields for record in caplog.records if record.name == "sidecar.access"]  # type: ignore[attr-defined]
        assert {"request_id": "refused-1", "status": "UNAUTHENTICATED"}.items() <= logged[1].items()
        assert [fields["status"] for fields in logged] == ["UNAUTHENTICATED"] * 3
        response = await call(port, None, metadata=(("authorization", "Bearer s3cret"),))
        assert len(response.results) == 1
        health = health_pb2_grpc.HealthStub(running.channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service="rerank.v1.Reranker"), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
