"""The OpenAPI document tells the truth: schemathesis, every check it has, against every operation of the
sidecar's own /openapi.json, finds nothing; and the document names each error, health's 503 and the
metrics' text."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from client.local_sidecar import free_port
from tests.conftest import RunningSidecar, running_sidecar
from tests.transport.test_embed import MINILM

# Small limits keep every request the schema allows quick; the document states them.
LIMITS = {"max_documents_per_request": 16, "max_chunks_per_doc": 4}


@pytest.fixture(scope="module")
async def openapi_sidecar(tiny_bert: Path) -> AsyncIterator[RunningSidecar]:
    async with running_sidecar(
        tiny_bert, http_port=free_port(), http_metrics=True, embed_model=MINILM, **LIMITS
    ) as running:
        yield running


@pytest.mark.timeout(900)
async def test_schemathesis_finds_no_failure_in_any_check(openapi_sidecar: RunningSidecar, tmp_path: Path):
    st = Path(sys.executable).with_name("st")
    process = await asyncio.create_subprocess_exec(
        str(st),
        "run",
        f"{openapi_sidecar.http_url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        "50",
        "--seed",
        "25",
        "--workers",
        "1",
        "--continue-on-failure",
        "--generation-database",
        ":memory:",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
        env={**os.environ, "NO_COLOR": "1"},
    )
    output, _ = await process.communicate()
    report = output.decode(errors="replace")
    (tmp_path / "schemathesis.txt").write_text(report)
    assert process.returncode == 0, report[-20000:]
    # Every operation tested (the five call routes, health, info, metrics), every phase that applies.
    assert "Tested: 8" in report, report[-5000:]
    assert "No issues found" in report, report[-5000:]


async def test_the_document_names_each_error_health_and_metrics(openapi_sidecar: RunningSidecar):
    async with httpx.AsyncClient(base_url=openapi_sidecar.http_url) as client:
        document = (await client.get("/openapi.json")).json()
    paths, schemas = document["paths"], document["components"]["schemas"]
    for path, shape, chooses_model in (
        ("/v2/rerank", "CohereError", True),
        ("/rerank", "TeiError", False),
        ("/v1/embeddings", "OpenAIError", True),
    ):
        responses = paths[path]["post"]["responses"]
        statuses = {"200", "400", "401", "413", "429", "500", "503", "504"} | (
            {"404"} if chooses_model else set()
        )
        assert set(responses) == statuses
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith(shape)
    assert "HTTPValidationError" not in schemas
    assert set(paths["/health"]["get"]["responses"]) == {"200", "503"}
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    top_n = schemas["CohereRerankV2Request"]["properties"]["top_n"]["anyOf"][0]
    assert top_n["maximum"] == LIMITS["max_documents_per_request"]
    assert schemas["OpenAIEmbeddingsRequest"]["properties"]["dimensions"]["anyOf"][0]["enum"] == [384]
    assert schemas["CohereRerankV2Request"]["properties"]["query"]["pattern"] == r"\S"
