"""A sidecar secured every way at once (TLS, mutual TLS and a bearer token) works with every client the
project ships: the Python clients, ``rerank-client``, the health check and the Node example; and each
way of getting the security wrong fails with a message that says what to fix."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from client.cli import main as rerank_client
from client.errors import SidecarRefused, SidecarUnreachable, UsageError
from client.sidecar_client import (
    AsyncRerankClient,
    RerankClient,
    RerankOptions,
    TlsConfig,
    channel_credentials,
)
from sidecar.healthcheck import main as healthcheck
from tests.client.conftest import MINILM
from tests.conftest import RunningSidecar, running_sidecar
from tests.pki import Pki

TOKEN = "s3cret-token"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node"
DOCUMENTS = [
    {"_id": "cats", "text": "Cats are obligate carnivores and eat meat."},
    {"_id": "stocks", "text": "The stock market fell sharply on Tuesday."},
    {"_id": "kittens", "text": "Kittens need food rich in protein."},
]
QUERY = "what do cats eat"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
async def secured(tiny_bert: Path, pki: Pki) -> AsyncIterator[RunningSidecar]:
    security = {
        "tls_cert_file": pki.file("server.pem"),
        "tls_key_file": pki.file("server-key.pem"),
        "tls_client_ca_file": pki.file("ca.pem"),
        "auth_token": TOKEN,
    }
    async with running_sidecar(tiny_bert, host="localhost", embed_model=MINILM, **security) as running:
        yield running


def target_of(secured: RunningSidecar) -> str:
    return f"localhost:{secured.server.port}"


def client_tls(pki: Pki, certificate: str = "client") -> TlsConfig:
    return TlsConfig(
        Path(pki.file("ca.pem")),
        Path(pki.file(f"{certificate}.pem")),
        Path(pki.file(f"{certificate}-key.pem")),
    )


async def test_the_python_clients_rerank(secured: RunningSidecar, pki: Pki):
    target = target_of(secured)

    def blocking() -> list[str]:
        with RerankClient(target, tls=client_tls(pki), token=TOKEN) as client:
            documents = [document["text"] for document in DOCUMENTS]
            return [result.id for result in client.rerank(QUERY, documents, RerankOptions(top_n=2)).results]

    async with AsyncRerankClient(target, tls=client_tls(pki), token=TOKEN) as client:
        ranking = await client.rerank(
            QUERY, [document["text"] for document in DOCUMENTS], RerankOptions(top_n=2)
        )
    assert len(ranking.results) == 2
    assert len(await asyncio.to_thread(blocking)) == 2


async def test_rerank_client_ingests_and_searches(
    secured: RunningSidecar, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    for name, value in {
        "RERANK_TARGET": target_of(secured),
        "RERANK_CLIENT_TLS_ROOT_CERTS": pki.file("ca.pem"),
        "RERANK_CLIENT_TLS_CLIENT_CERT": pki.file("client.pem"),
        "RERANK_CLIENT_TLS_CLIENT_KEY": pki.file("client-key.pem"),
        "RERANK_CLIENT_TOKEN": TOKEN,
        "RERANK_CLIENT_INDEX_DIR": str(tmp_path / "index"),
    }.items():
        monkeypatch.setenv(name, value)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps(document) + "\n" for document in DOCUMENTS))
    assert await asyncio.to_thread(rerank_client, ["ingest", str(source)]) == 0
    capsys.readouterr()
    assert await asyncio.to_thread(rerank_client, ["search", QUERY, "--format", "json", "--strict"]) == 0
    response = json.loads(capsys.readouterr().out)
    assert response["reranked"] is True
    assert {result["id"] for result in response["results"]} == {"cats", "stocks", "kittens"}


async def test_the_health_check_reads_the_servers_own_settings(secured: RunningSidecar, pki: Pki):
    server_environment = {
        "RERANK_PORT": str(secured.server.port),
        "RERANK_TLS_CERT_FILE": pki.file("server.pem"),
        "RERANK_TLS_KEY_FILE": pki.file("server-key.pem"),
        "RERANK_TLS_CLIENT_CA_FILE": pki.file("ca.pem"),
        "RERANK_AUTH_TOKEN": TOKEN,
    }
    # 127.0.0.1 is not in the certificate: the check verifies the server under its DNS name.
    assert await asyncio.to_thread(healthcheck, [], server_environment) == 0
    plaintext = {"RERANK_PORT": str(secured.server.port)}
    assert await asyncio.to_thread(healthcheck, [], plaintext) == 1


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None, reason="needs Node.js")
async def test_the_node_example_reranks(secured: RunningSidecar, pki: Pki):
    install = await asyncio.create_subprocess_exec(
        "npm", "ci", "--no-audit", "--no-fund", cwd=EXAMPLE, stdout=asyncio.subprocess.DEVNULL
    )
    assert await asyncio.wait_for(install.wait(), timeout=300) == 0
    documents = [{"id": document["_id"], "text": document["text"]} for document in DOCUMENTS]
    node = await asyncio.create_subprocess_exec(
        "node", "rerank.js", "--target", target_of(secured), "--query", QUERY,
        "--documents", json.dumps(documents), "--top-n", "2",
        "--tls-root-certs", pki.file("ca.pem"), "--tls-client-cert", pki.file("client.pem"),
        "--tls-client-key", pki.file("client-key.pem"), "--token", TOKEN,
        cwd=EXAMPLE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(node.communicate(), timeout=60)
    assert node.returncode == 0, stderr.decode()
    assert len(json.loads(stdout)["rerank"]["results"]) == 2


@pytest.mark.parametrize(
    ("token", "says"),
    [("", "missing bearer token: send `authorization: Bearer <token>`"), ("guess", "token .* is not valid")],
)
async def test_a_missing_or_wrong_token_is_unauthenticated(secured: RunningSidecar, pki: Pki, token, says):
    async with AsyncRerankClient(target_of(secured), tls=client_tls(pki), token=token) as client:
        with pytest.raises(SidecarRefused, match="set --token") as refused:
            await client.rerank(QUERY, ["a passage"])
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert re.search(says, refused.value.details())
    assert "guess" not in str(refused.value)  # a token never appears in an error


@pytest.mark.parametrize("certificate", [None, "stranger"])
async def test_a_missing_or_unknown_client_certificate_fails_the_handshake(
    secured: RunningSidecar, pki: Pki, certificate: str | None
):
    tls = TlsConfig(Path(pki.file("ca.pem"))) if certificate is None else client_tls(pki, certificate)
    async with AsyncRerankClient(target_of(secured), tls=tls, token=TOKEN, max_attempts=1) as client:
        with pytest.raises(SidecarUnreachable, match="TLS handshake") as failed:
            await client.rerank(QUERY, ["a passage"], timeout=5)
    assert "--tls-client-cert" in str(failed.value)
    assert TOKEN not in str(failed.value)


def test_a_token_over_plaintext_to_another_host_is_refused_unless_allowed():
    with pytest.raises(UsageError, match="--allow-insecure-token") as refused:
        channel_credentials("10.0.0.7:50051", None, TOKEN, allow_insecure_token=False)
    assert TOKEN not in str(refused.value)
    credentials, metadata = channel_credentials("10.0.0.7:50051", None, TOKEN, allow_insecure_token=True)
    assert credentials is None
    assert metadata == (("authorization", f"Bearer {TOKEN}"),)
    for loopback in ("127.0.0.1:50051", "localhost:50051", "[::1]:50051", "ipv4:127.0.0.1:1,127.0.0.2:2"):
        credentials, metadata = channel_credentials(loopback, None, TOKEN, allow_insecure_token=False)
        assert credentials is not None, loopback
        assert metadata is None
