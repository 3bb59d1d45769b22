"""``rerank-client`` run as a user runs it, into each mistake a user can make or failure they can meet: one
line on stderr naming what is wrong, a distinct exit code, and no traceback unless ``--debug`` asks."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import pytest

from client.errors import (
    DOCUMENTS_REJECTED,
    DeadlineExceeded,
    ElasticsearchRefused,
    ElasticsearchUnreachable,
    IndexMismatch,
    IndexNotFound,
    InputInvalid,
    InputMissing,
    SidecarError,
    SidecarRefused,
    SidecarUnreachable,
    UsageError,
)
from client.ingest import ingest
from client.local_sidecar import free_port
from client.retrieval.elasticsearch import ElasticsearchRetriever
from client.retrieval.embedded import EmbeddedRetriever
from rerank.v1 import rerank_pb2, rerank_pb2_grpc
from tests.client.conftest import FAKE_DIMS, embed_fake, fake_vector, new_index_name, synthetic_corpus
from tests.client.test_eval import write_beir

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str


async def rerank_client(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Run:
    """``python -m client ARGS`` with this checkout's code and none of the caller's client settings."""
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith(("RERANK_", "ES_"))
    }
    path = os.pathsep.join([str(ROOT), str(ROOT / "protos"), environment.get("PYTHONPATH", "")])
    environment.update(PYTHONPATH=path, COLUMNS="200", **(env or {}))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "client",
        *args,
        cwd=cwd,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


def assert_fails(run: Run, exit_code: int, *named: str) -> str:
    """Exactly one line on stderr, naming each of ``named``; the exit code; no traceback anywhere."""
    assert "Traceback" not in run.stderr + run.stdout, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert run.returncode == exit_code, run.stderr
    for name in named:
        assert name in lines[0]
    return lines[0]


class ScriptedSidecar(rerank_pb2_grpc.EmbedderServicer, rerank_pb2_grpc.RerankerServicer):
    """Embed answers vectors of ``dims`` dimensions from ``model_id``, can wait before answering and can
    require a token; Info reports that model (or none). RerankStream fails with ``rerank_status``: by default
    a full queue, on which a search falls back to stage 1's order."""

    def __init__(self) -> None:
        self.dims = FAKE_DIMS
        self.model_id = "scripted-embedder"
        self.delay_s = 0.0
        self.token = ""
        self.rerank_status = grpc.StatusCode.RESOURCE_EXHAUSTED

    async def RerankStream(
        self, requests: AsyncIterator[rerank_pb2.RerankStreamRequest], context: grpc.aio.ServicerContext
    ) -> None:
        # Read to the half-close first: an abort while the client still sends can reach it as INTERNAL.
        async for _ in requests:
            pass
        await context.abort(self.rerank_status, "a scripted RerankStream failure")

    async def Info(
        self, request: rerank_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> rerank_pb2.InfoResponse:
        if not self.model_id:
            return rerank_pb2.InfoResponse(model_id="scripted-reranker")
        embedding = rerank_pb2.EmbeddingModelInfo(model_id=self.model_id, dims=self.dims)
        return rerank_pb2.InfoResponse(model_id="scripted-reranker", embedding_model=embedding)

    async def Embed(
        self, request: rerank_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> rerank_pb2.EmbedResponse:
        if self.token and dict(context.invocation_metadata()).get("authorization") != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        await asyncio.sleep(self.delay_s)
        vectors = [np.resize(fake_vector(text), self.dims) for text in request.texts]
        return rerank_pb2.EmbedResponse(
            embeddings=[rerank_pb2.Embedding(values=vector.tolist()) for vector in vectors],
            dims=self.dims,
            model_id=self.model_id,
        )


@dataclass
class Scripted:
    servicer: ScriptedSidecar
    target: str


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    server = grpc.aio.server()
    servicer = ScriptedSidecar()
    rerank_pb2_grpc.add_EmbedderServicer_to_server(servicer, server)
    rerank_pb2_grpc.add_RerankerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Scripted(servicer, f"127.0.0.1:{port}")
    finally:
        await server.stop(grace=None)


@pytest.fixture
def documents(tmp_path: Path) -> Path:
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"_id": d.id, "text": d.text}) + "\n" for d in synthetic_corpus(12)))
    return source


@pytest.fixture
def embedded_index(tmp_path: Path) -> Path:
    directory = tmp_path / "index"
    report = ingest(synthetic_corpus(30), EmbeddedRetriever(directory), embed_fake)
    assert report.indexed == 30
    return directory


# ---- the rows of issue 16: each of these ended in a traceback ------------------------------------------


async def test_ingest_of_a_missing_file(tmp_path: Path, scripted: Scripted):
    run = await rerank_client("ingest", "missing.jsonl", "--target", scripted.target, cwd=tmp_path)
    assert_fails(run, InputMissing.exit_code, "missing.jsonl", "does not exist")


async def test_search_with_es_url_where_nothing_listens(tmp_path: Path, scripted: Scripted):
    url = f"http://127.0.0.1:{free_port()}"
    run = await rerank_client(
        "search", "neuron", "--target", scripted.target, cwd=tmp_path, env={"ES_URL": url}
    )
    assert_fails(run, ElasticsearchUnreachable.exit_code, url, "--es-url")


async def test_search_of_an_elasticsearch_index_that_does_not_exist(
    tmp_path: Path, scripted: Scripted, es_url: str
):
    env = {"ES_URL": es_url, "ES_INDEX": "no-such-index"}
    run = await rerank_client("search", "neuron", "--target", scripted.target, cwd=tmp_path, env=env)
    assert_fails(run, IndexNotFound.exit_code, "'no-such-index'", es_url)


async def test_eval_of_a_directory_that_is_not_a_beir_dataset(tmp_path: Path, scripted: Scripted):
    (tmp_path / "notes").mkdir()
    run = await rerank_client("eval", "notes", "--target", scripted.target, cwd=tmp_path)
    assert_fails(run, InputInvalid.exit_code, "notes", "corpus.jsonl")


@pytest.mark.parametrize("state", ["empty", "missing"])
async def test_search_with_an_index_dir_without_an_index(tmp_path: Path, scripted: Scripted, state: str):
    if state == "empty":
        (tmp_path / "nothing-here").mkdir()
    run = await rerank_client(
        "search", "neuron", "--index-dir", "nothing-here", "--target", scripted.target, cwd=tmp_path
    )
    assert_fails(run, IndexNotFound.exit_code, "nothing-here", "rerank-client ingest")


# ---- the other failures a user can cause or meet --------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"\xff\xfe\x00binary", "not UTF-8"), (b"id,text\n1,a csv file\n", "not JSON Lines")],
)
async def test_ingest_of_a_file_in_the_wrong_format(
    tmp_path: Path, scripted: Scripted, content: bytes, reason: str
):
    (tmp_path / "corpus.csv").write_bytes(content)
    run = await rerank_client(
        "ingest", "corpus.csv", "--target", scripted.target, "--index-dir", "index", cwd=tmp_path
    )
    assert_fails(run, InputInvalid.exit_code, "corpus.csv", reason)
    assert not (tmp_path / "index").exists()  # refused before anything was written


@pytest.mark.parametrize("backend", ["embedded", "elasticsearch"])
async def test_an_ingest_that_refuses_every_record_lists_them_and_exits_1(
    tmp_path: Path, scripted: Scripted, backend: str, request: pytest.FixtureRequest
):
    (tmp_path / "bad.jsonl").write_text('{"_id": "x[/i]", "text": ""}\n{"_id": "b"}\nnot json\n')
    env = {"ES_URL": request.getfixturevalue("es_url")} if backend == "elasticsearch" else {}
    run = await rerank_client(
        "ingest",
        "bad.jsonl",
        "--target",
        scripted.target,
        "--es-index",
        new_index_name(),
        cwd=tmp_path,
        env=env,
    )
    assert run.returncode == DOCUMENTS_REJECTED, run.stderr
    assert "Traceback" not in run.stderr
    assert "No documents indexed: every record was refused." in run.stdout
    for refused in ("x[/i]", "b", "bad.jsonl:3", "3 documents rejected"):
        assert refused in run.stdout  # an id is printed as it is, not read as rich markup


async def test_ingest_of_an_empty_file(tmp_path: Path, scripted: Scripted):
    (tmp_path / "empty.jsonl").write_text("\n")
    run = await rerank_client("ingest", "empty.jsonl", "--target", scripted.target, cwd=tmp_path)
    assert_fails(run, InputInvalid.exit_code, "empty.jsonl", "no records")


async def test_ingest_needs_the_sidecar(tmp_path: Path, documents: Path):
    target = f"127.0.0.1:{free_port()}"
    run = await rerank_client("ingest", str(documents), "--target", target, cwd=tmp_path)
    assert_fails(run, SidecarUnreachable.exit_code, target, "--target")


async def test_a_demo_whose_sidecar_cannot_start(tmp_path: Path):
    run = await rerank_client("demo", "--model", "/nonexistent/dir", "--startup-timeout", "60", cwd=tmp_path)
    assert_fails(run, SidecarUnreachable.exit_code, "exited with status", "'/nonexistent/dir'")


async def test_a_sidecar_refusing_the_token(tmp_path: Path, scripted: Scripted, documents: Path):
    scripted.servicer.token = "right"
    common = ["ingest", str(documents), "--target", scripted.target, "--index-dir", "index"]
    refused = await rerank_client(*common, cwd=tmp_path, env={"RERANK_CLIENT_TOKEN": "wrong"})
    assert_fails(refused, SidecarRefused.exit_code, scripted.target, "UNAUTHENTICATED", "--token")
    accepted = await rerank_client(*common, cwd=tmp_path, env={"RERANK_CLIENT_TOKEN": "right"})
    assert accepted.returncode == 0, accepted.stderr


async def test_a_deadline_that_passes(tmp_path: Path, scripted: Scripted, documents: Path):
    # Embed waits past the deadline; Info, asked first, answers at once but must fit the same deadline
    # on a busy machine too, so the deadline is not shorter than a client's connect and first call.
    scripted.servicer.delay_s = 6.0
    run = await rerank_client(
        "ingest", str(documents), "--target", scripted.target, "--timeout", "1.5", cwd=tmp_path
    )
    assert_fails(run, DeadlineExceeded.exit_code, "Embed", "1.5 s", "--timeout")


async def test_a_sidecar_without_an_embedding_model(tmp_path: Path, scripted: Scripted, documents: Path):
    scripted.servicer.model_id = ""
    run = await rerank_client("ingest", str(documents), "--target", scripted.target, cwd=tmp_path)
    assert_fails(run, SidecarError.exit_code, scripted.target, "no embedding model", "--embed-model")


async def test_an_index_built_with_another_embedding_model(
    tmp_path: Path, scripted: Scripted, documents: Path
):
    common = ["--index-dir", "index", "--target", scripted.target]
    scripted.servicer.model_id = "model-a"
    built = await rerank_client("ingest", str(documents), *common, cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    scripted.servicer.model_id = "model-b"  # the same dimension: only the recorded name tells them apart
    searched = await rerank_client("search", "neuron", *common, cwd=tmp_path)
    assert_fails(searched, IndexMismatch.exit_code, "index", "'model-a'", "'model-b'")
    ingested = await rerank_client("ingest", str(documents), *common, cwd=tmp_path)
    assert_fails(ingested, IndexMismatch.exit_code, "index", "'model-a'", "'model-b'")


async def test_an_embedded_index_of_another_dimension(
    tmp_path: Path, scripted: Scripted, embedded_index: Path, documents: Path
):
    scripted.servicer.dims = FAKE_DIMS // 2
    common = ["--index-dir", str(embedded_index), "--target", scripted.target]
    searched = await rerank_client("search", "neuron", *common, cwd=tmp_path)
    line = assert_fails(searched, IndexMismatch.exit_code, str(embedded_index))
    assert f"{FAKE_DIMS}-dimensional" in line
    assert f"{FAKE_DIMS // 2} dimensions" in line
    ingested = await rerank_client("ingest", str(documents), *common, cwd=tmp_path)
    assert_fails(
        ingested, IndexMismatch.exit_code, f"{FAKE_DIMS}-dimensional", f"{FAKE_DIMS // 2} dimensions"
    )


async def test_an_elasticsearch_index_of_another_dimension(
    tmp_path: Path, scripted: Scripted, es_url: str, es_corpus_index: ElasticsearchRetriever
):
    scripted.servicer.dims = FAKE_DIMS // 2
    env = {"ES_URL": es_url, "ES_INDEX": es_corpus_index.index}
    run = await rerank_client("search", "neuron", "--target", scripted.target, cwd=tmp_path, env=env)
    line = assert_fails(run, IndexMismatch.exit_code, es_corpus_index.index)
    assert f"{FAKE_DIMS}-dimensional" in line
    assert f"{FAKE_DIMS // 2} dimensions" in line


class _RefusingCluster(BaseHTTPRequestHandler):
    """Answers every request as a cluster with security on answers bad credentials."""

    def do_GET(self) -> None:
        body = json.dumps(
            {
                "error": {
                    "root_cause": [{"type": "security_exception", "reason": "unable to authenticate"}],
                    "type": "security_exception",
                    "reason": "unable to authenticate",
                },
                "status": 401,
            }
        ).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Elastic-Product", "Elasticsearch")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test reads the client's stderr only."""


@pytest.fixture
def refusing_cluster() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RefusingCluster)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def test_elasticsearch_refusing_the_credentials(
    tmp_path: Path, scripted: Scripted, refusing_cluster: str
):
    env = {"ES_URL": refusing_cluster, "ES_API_KEY": "bad-key"}
    run = await rerank_client("search", "neuron", "--target", scripted.target, cwd=tmp_path, env=env)
    assert_fails(run, ElasticsearchRefused.exit_code, refusing_cluster, "--es-api-key")


async def test_a_dataset_without_qrels_for_the_split(tmp_path: Path, scripted: Scripted):
    write_beir(tmp_path / "data", synthetic_corpus(10))
    run = await rerank_client("eval", "data", "--split", "dev", "--target", scripted.target, cwd=tmp_path)
    assert_fails(run, InputInvalid.exit_code, "'dev'", "dev.tsv", "--split")


async def test_an_eval_report_into_a_missing_directory(tmp_path: Path, scripted: Scripted):
    write_beir(tmp_path / "data", synthetic_corpus(10))
    run = await rerank_client(
        "eval", "data", "--output", "reports/eval.json", "--target", scripted.target, cwd=tmp_path
    )
    assert_fails(run, InputMissing.exit_code, "--output", "reports/eval.json")


async def test_an_index_dir_that_cannot_be_written(tmp_path: Path, scripted: Scripted, documents: Path):
    (tmp_path / "a-file").write_text("not a directory")
    run = await rerank_client(
        "ingest", str(documents), "--index-dir", "a-file", "--target", scripted.target, cwd=tmp_path
    )
    assert_fails(run, InputInvalid.exit_code, "a-file", "--index-dir")


async def test_a_strict_search_fails_as_its_sidecar_does(
    tmp_path: Path, scripted: Scripted, embedded_index: Path
):
    run = await rerank_client(
        "search",
        "neuron",
        "--strict",
        "--index-dir",
        str(embedded_index),
        "--target",
        scripted.target,
        cwd=tmp_path,
    )
    assert_fails(run, SidecarError.exit_code, "reranking failed", scripted.target, "RerankStream")


async def test_a_search_fails_without_strict_where_falling_back_would_hide_a_refused_request(
    tmp_path: Path, scripted: Scripted, embedded_index: Path
):
    scripted.servicer.rerank_status = grpc.StatusCode.INVALID_ARGUMENT
    run = await rerank_client(
        "search", "neuron", "--index-dir", str(embedded_index), "--target", scripted.target, cwd=tmp_path
    )
    assert_fails(run, SidecarError.exit_code, "reranking failed", "RerankStream", "INVALID_ARGUMENT")


@pytest.mark.parametrize("how", [["--filters", "lang"], []])
async def test_filters_that_do_not_parse(tmp_path: Path, how: Sequence[str]):
    env = {} if how else {"RERANK_CLIENT_FILTERS": "lang"}
    run = await rerank_client("search", "neuron", *how, cwd=tmp_path, env=env)
    assert_fails(run, UsageError.exit_code, "rerank-client search: error:", "--filters", "'lang'")


@pytest.mark.parametrize(
    ("environ", "flags", "named"),
    [
        ({"RERANK_CLIENT_MODE": "nope"}, [], ["RERANK_CLIENT_MODE='nope'", "hybrid, bm25, vector"]),
        ({"RERANK_CLIENT_LOG_LEVEL": "verbose"}, [], ["RERANK_CLIENT_LOG_LEVEL", "DEBUG, INFO"]),
        ({"RERANK_CLIENT_FORMAT": "xml"}, [], ["RERANK_CLIENT_FORMAT='xml'", "table, json, jsonl"]),
        ({"RERANK_CLIENT_FUSION_METHOD": "foo"}, [], ["RERANK_CLIENT_FUSION_METHOD", "rrf, convex"]),
        ({"ES_VECTOR_INDEX": "flat"}, [], ["ES_VECTOR_INDEX='flat'", "int8_hnsw"]),
        ({"RERANK_CLIENT_TIMEOUT": "nan"}, [], ["RERANK_CLIENT_TIMEOUT='nan'", "finite"]),
        ({}, ["--bm25-weight", "inf"], ["--bm25-weight", "'inf'", "finite"]),
    ],
)
async def test_a_variable_outside_its_choices_or_a_number_that_is_not_finite(
    tmp_path: Path, environ: dict[str, str], flags: list[str], named: list[str]
):
    run = await rerank_client("search", "neuron", *flags, cwd=tmp_path, env=environ)
    assert_fails(run, UsageError.exit_code, "rerank-client search: error:", *named)
    if environ:  # a variable only other commands read fails none of them
        other = await rerank_client("demo", "--help", cwd=tmp_path, env=environ)
        assert other.returncode == 0, other.stderr


@pytest.mark.parametrize(
    "flags", [["--candidates", "20", "--num-candidates", "10"], ["--num-candidates", "10001"]]
)
async def test_num_candidates_below_the_candidates_or_above_elasticsearchs_limit(
    tmp_path: Path, flags: list[str]
):
    run = await rerank_client("search", "neuron", *flags, cwd=tmp_path)
    assert_fails(run, UsageError.exit_code, "--num-candidates", "10000", f"got {flags[-1]}")


@pytest.mark.parametrize("how", ["flag", "environment"])
async def test_debug_adds_the_traceback(tmp_path: Path, how: str):
    args = ["ingest", "missing.jsonl", *(["--debug"] if how == "flag" else [])]
    run = await rerank_client(*args, cwd=tmp_path, env={"RERANK_CLIENT_DEBUG": "1"} if how != "flag" else {})
    assert run.returncode == InputMissing.exit_code
    assert "Traceback" in run.stderr
    assert run.stderr.splitlines()[-1].endswith(
        "missing.jsonl does not exist: give a JSONL file or a BEIR dataset directory"
    )


# ---- output for scripts ---------------------------------------------------------------------------------

RESULT_FIELDS = {
    "rank",
    "id",
    "title",
    "stage1_rank",
    "bm25_rank",
    "vector_rank",
    "bm25_score",
    "vector_score",
    "fused_score",
    "rerank_score",
    "reranked",
}


async def test_piped_search_prints_json_that_says_why_it_was_not_reranked(
    tmp_path: Path, scripted: Scripted, embedded_index: Path
):
    common = ["search", "neuron brain", "--index-dir", str(embedded_index), "--target", scripted.target]
    run = await rerank_client(*common, "--top-k", "3", "--explain", cwd=tmp_path)
    assert run.returncode == 0, run.stderr  # fails open: stage 1's order, marked
    response = json.loads(run.stdout)  # stdout is a pipe, so JSON is the default
    assert set(response) == {
        "query",
        "reranked",
        "not_reranked_reason",
        "model_id",
        "candidates",
        "notes",
        "timings_ms",
        "results",
    }
    assert response["reranked"] is False
    assert "RESOURCE_EXHAUSTED" in response["not_reranked_reason"]
    timings = {"embed_ms", "first_page_ms", "retrieval_ms", "rerank_ms", "total_ms"}
    assert set(response["timings_ms"]) == timings
    assert [result["rank"] for result in response["results"]] == [1, 2, 3]
    for result in response["results"]:
        assert set(result) == RESULT_FIELDS | {"not_reranked_reason"}
        assert result["reranked"] is False
        assert result["rerank_score"] is None
        assert result["stage1_rank"] == result["rank"]
        assert result["not_reranked_reason"] == response["not_reranked_reason"]

    lines = await rerank_client(*common, "--top-k", "3", cwd=tmp_path, env={"RERANK_CLIENT_FORMAT": "jsonl"})
    records = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [record["id"] for record in records] == [result["id"] for result in response["results"]]
    for record in records:
        assert set(record) == RESULT_FIELDS | {"query", "timings_ms"}  # no reason without --explain
        assert record["query"] == "neuron brain"
