"""The Node.js example client (@grpc/grpc-js, loading the .proto) ranks as the Python client does."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from client.sidecar_client import RerankClient, RerankOptions
from rerank.v1 import rerank_pb2
from tests.conftest import RunningSidecar

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "node"
DOCUMENTS = [
    {"id": f"doc-{i}", "text": text}
    for i, text in enumerate(
        [
            "Cats are obligate carnivores and eat meat.",
            "The stock market fell sharply on Tuesday.",
            "Kittens need food rich in protein and fat.",
            "A recipe for vegetable soup with carrots.",
            "Domestic cats are often fed dry kibble.",
        ]
    )
]
QUERY = "what do cats eat"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None, reason="needs Node.js"
)


async def run(*command: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *command, cwd=EXAMPLE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=300)
    assert process.returncode == 0, f"{' '.join(command)} failed:\n{stderr.decode()}"
    return stdout.decode()


@pytest.mark.slow
async def test_node_client_matches_the_python_client(sidecar: RunningSidecar):
    await run("npm", "ci", "--no-audit", "--no-fund")
    target = f"127.0.0.1:{sidecar.server.port}"
    output = await run(
        "node", "rerank.js", "--target", target, "--query", QUERY, "--documents", json.dumps(DOCUMENTS),
        "--top-n", "3", "--batch-size", "2",
    )  # fmt: skip
    node = json.loads(output)

    def python_ranking():
        with RerankClient(target) as client:
            documents = [rerank_pb2.Document(id=d["id"], text=d["text"]) for d in DOCUMENTS]
            return client.rerank(QUERY, documents, RerankOptions(top_n=3))

    python = await asyncio.get_running_loop().run_in_executor(None, python_ranking)
    expected = [(result.index, result.id) for result in python.results]
    assert [(r["index"], r["id"]) for r in node["rerank"]["results"]] == expected
    assert [r["score"] for r in node["rerank"]["results"]] == pytest.approx(
        [r.score for r in python.results], abs=1e-6
    )
    assert [(r["index"], r["id"]) for r in node["stream"]["final"]["results"]] == expected
    assert sorted(batch["batch"] for batch in node["stream"]["batches"]) == [0, 1, 2]
    streamed = sorted(r["index"] for batch in node["stream"]["batches"] for r in batch["results"])
    assert streamed == list(range(len(DOCUMENTS)))
