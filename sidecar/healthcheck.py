"""``rerank-sidecar-healthcheck``: exit 0 when the local server reports SERVING through grpc.health.v1.

For container health checks (both Dockerfiles, and the probes of deploy/'s tls component); it imports
neither torch nor the model code. It reads the server's own ``RERANK_*`` variables, so it speaks TLS,
mutual TLS and the bearer token exactly when the server asks for them:
- TLS when ``RERANK_TLS_CERT_FILE`` is set. The server is verified against ``--tls-root-certs``, by
  default the client CA and the server's own certificate (a self-signed certificate, or one CA for
  servers and clients), under the first DNS name of the server's certificate (``--server-name``), since
  the check connects to 127.0.0.1.
- Mutual TLS when ``RERANK_TLS_CLIENT_CA_FILE`` is set: it presents ``--tls-client-cert`` and
  ``--tls-client-key``, by default the server's own certificate and key.
- The bearer token of ``RERANK_AUTH_TOKEN`` (the health service is open, but a proxy in front may not be).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--address",
        default=f"127.0.0.1:{environ.get('RERANK_PORT', '50051')}",
        help="host:port of the sidecar (default: 127.0.0.1 and $RERANK_PORT or 50051)",
    )
    parser.add_argument("--service", default="", help="service to check; empty means the whole server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds before giving up")
    for flag, env, help in (
        ("--tls-cert-file", "RERANK_TLS_CERT_FILE", "the server's certificate chain; set means TLS"),
        ("--tls-key-file", "RERANK_TLS_KEY_FILE", "the server's key"),
        ("--tls-client-ca-file", "RERANK_TLS_CLIENT_CA_FILE", "the server's client CA; set means mutual TLS"),
        ("--auth-token", "RERANK_AUTH_TOKEN", "bearer token to send"),
        (
            "--tls-root-certs",
            "RERANK_HEALTHCHECK_TLS_ROOT_CERTS",
            "PEM roots to verify the server with (default: the client CA and the server certificate)",
        ),
        (
            "--tls-client-cert",
            "RERANK_HEALTHCHECK_TLS_CLIENT_CERT",
            "client certificate for mutual TLS (default: the server certificate)",
        ),
        (
            "--tls-client-key",
            "RERANK_HEALTHCHECK_TLS_CLIENT_KEY",
            "client key for mutual TLS (default: the server key)",
        ),
        (
            "--server-name",
            "RERANK_HEALTHCHECK_SERVER_NAME",
            "name to verify the server certificate against (default: its first DNS name)",
        ),
    ):
        parser.add_argument(flag, default=environ.get(env, ""), help=f"{help} [env {env}]")
    return parser


def first_dns_name(certificate_pem: bytes) -> str:
    """The first DNS name of a PEM certificate's subjectAltName, or '' when it lists none."""
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    dns_names = names.get_values_for_type(x509.DNSName)
    return dns_names[0] if dns_names else ""


def channel_for(args: argparse.Namespace) -> grpc.Channel:
    """A plaintext channel, or TLS (mutual when the server requires client certificates) with the token."""
    if not args.tls_cert_file:
        if args.auth_token:  # call credentials need a secure channel; local ones never leave the host
            local = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
            tokened = grpc.composite_channel_credentials(
                local, grpc.access_token_call_credentials(args.auth_token)
            )
            return grpc.secure_channel(args.address, tokened)
        return grpc.insecure_channel(args.address)
    server_chain = Path(args.tls_cert_file).read_bytes()
    if args.tls_root_certs:
        roots = Path(args.tls_root_certs).read_bytes()
    else:
        client_ca = Path(args.tls_client_ca_file).read_bytes() if args.tls_client_ca_file else b""
        roots = client_ca + b"\n" + server_chain
    client_key = client_chain = None
    if args.tls_client_ca_file:
        client_chain = Path(args.tls_client_cert or args.tls_cert_file).read_bytes()
        client_key = Path(args.tls_client_key or args.tls_key_file).read_bytes()
    credentials = grpc.ssl_channel_credentials(roots, client_key, client_chain)
    if args.auth_token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(args.auth_token)
        )
    server_name = args.server_name or first_dns_name(server_chain)
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(args.address, credentials, options=options)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> int:
    args = build_parser(environ).parse_args(argv)
    try:
        with channel_for(args) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except OSError as exc:
        print(f"unhealthy: cannot read a TLS file: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"unhealthy: the server certificate is not a PEM certificate: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"unhealthy: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
