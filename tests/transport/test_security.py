"""TLS, mutual TLS and the bearer token, with certificates made here."""

from __future__ import annotations

import datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rerank.v1 import rerank_pb2, rerank_pb2_grpc
from tests.conftest import docs, running_sidecar

REQUEST = rerank_pb2.RerankRequest(query="q", documents=docs("a passage"))


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


class Pki:
    """A CA, a server certificate for localhost, and a client certificate, as PEM files."""

    def __init__(self, directory: Path) -> None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate("test CA", ca_key, "test CA", ca_key, ca=True)
        self.ca = self._write(directory / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
        for role in ("server", "client"):
            key = ec.generate_private_key(ec.SECP256R1())
            certificate = _certificate(role, key, "test CA", ca_key, ca=False)
            self._write(directory / f"{role}.pem", certificate.public_bytes(serialization.Encoding.PEM))
            key_pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            self._write(directory / f"{role}-key.pem", key_pem)
        self.directory = directory

    @staticmethod
    def _write(path: Path, data: bytes) -> Path:
        path.write_bytes(data)
        return path

    def file(self, name: str) -> str:
        return str(self.directory / name)

    def channel_credentials(self, with_client_certificate: bool) -> grpc.ChannelCredentials:
        client = {}
        if with_client_certificate:
            client = {
                "private_key": (self.directory / "client-key.pem").read_bytes(),
                "certificate_chain": (self.directory / "client.pem").read_bytes(),
            }
        return grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes(), **client)


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


async def test_bearer_token_is_required_but_health_stays_open(tiny_bert: Path):
    async with running_sidecar(tiny_bert, auth_token="s3cret") as running:
        port = running.server.port
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await call(port, None)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing bearer token" in missing.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await call(port, None, metadata=(("authorization", "Bearer guess"),))
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "not valid" in wrong.value.details()
        response = await call(port, None, metadata=(("authorization", "Bearer s3cret"),))
        assert len(response.results) == 1
        health = health_pb2_grpc.HealthStub(running.channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service="rerank.v1.Reranker"), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
