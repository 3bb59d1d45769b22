"""Certificates made in the tests: a CA, a server certificate for localhost, and client certificates."""

from __future__ import annotations

import datetime
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


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
    """A CA, a server certificate for localhost, and a client certificate, as PEM files; and a
    "stranger" client certificate from another CA, which the server must not accept."""

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
        other_ca_key = ec.generate_private_key(ec.SECP256R1())
        stranger_key = ec.generate_private_key(ec.SECP256R1())
        stranger = _certificate("stranger", stranger_key, "other CA", other_ca_key, ca=False)
        self._write(directory / "stranger.pem", stranger.public_bytes(serialization.Encoding.PEM))
        self._write(
            directory / "stranger-key.pem",
            stranger_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
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
