"""``rerank-client`` end to end: ingest and search with the real embedder (MiniLM) in the sidecar."""

from __future__ import annotations

import asyncio
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from client.cli import build_parser, main
from client.documents import Document
from client.evaluation.report import ConfigurationResult, EvalReport, report_table
from client.output import eval_lines, results_table
from client.pipeline import SearchResponse, SearchResult, StageTimings
from client.retrieval.base import Candidate
from client.settings import ClientSettings, parse_filters
from envflags import settings_from, settings_table
from tests.conftest import RunningSidecar

README = Path(__file__).resolve().parents[2] / "README.md"

DOCUMENTS = [
    {
        "_id": "cats",
        "title": "Cats",
        "text": "Cats are obligate carnivores and eat meat.",
        "metadata": {"kind": "pet"},
    },
    {"_id": "kittens", "text": "Kittens need food rich in protein.", "metadata": {"kind": "pet"}},
    {"_id": "stocks", "text": "The stock market fell sharply on Tuesday.", "metadata": {"kind": "news"}},
    {"_id": "broken", "title": "no text"},
]


async def test_ingest_then_search_prints_both_stages(
    embedding_sidecar: RunningSidecar, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in DOCUMENTS))
    common = [
        "--target",
        f"127.0.0.1:{embedding_sidecar.server.port}",
        "--index-dir",
        str(tmp_path / "index"),
    ]

    ingested = await asyncio.to_thread(main, ["ingest", str(source), *common])
    rerun = await asyncio.to_thread(main, ["ingest", str(source), *common])
    ingest_output = capsys.readouterr().out
    searched = await asyncio.to_thread(
        main, ["search", "what do cats eat", *common, "--filters", "kind=pet", "--format", "table"]
    )
    search_output = capsys.readouterr().out
    as_json = await asyncio.to_thread(main, ["search", "what do cats eat", *common, "--format", "json"])
    response = json.loads(capsys.readouterr().out)

    assert (ingested, rerun) == (1, 1)  # one document rejected, each time
    assert "broken" in ingest_output
    assert "it holds 3" in ingest_output  # the rerun updated, not duplicated
    assert searched == 0
    assert "cats" in search_output
    assert "kittens" in search_output
    assert "stocks" not in search_output  # filtered out on both legs
    assert "NOT RERANKED" not in search_output
    assert as_json == 0
    assert (response["reranked"], response["not_reranked_reason"]) == (True, None)
    assert response["model_id"]
    assert response["timings_ms"]["total_ms"] > 0
    assert {result["id"] for result in response["results"]} == {"cats", "kittens", "stocks"}
    for result in response["results"]:
        assert result["reranked"] is True
        assert isinstance(result["rerank_score"], float)
        assert isinstance(result["fused_score"], float)
        assert result["stage1_rank"] >= 1
        assert "not_reranked_reason" not in result  # only with --explain


def test_settings_come_from_flags_then_environment():
    parser = build_parser(
        {"ES_URL": "http://es:9200", "RERANK_CLIENT_TOP_K": "3", "RERANK_CLIENT_STRICT": "true"}
    )
    settings = settings_from(parser.parse_args(["search", "q", "--top-k", "5"]), ClientSettings)
    assert (settings.es_url, settings.top_k, settings.strict) == ("http://es:9200", 5, True)
    assert parse_filters("lang=en, lang=de,year=2020") == {"lang": ["en", "de"], "year": "2020"}
    with pytest.raises(ValueError, match="name=value"):
        ClientSettings(filters="lang")


def test_a_table_fits_the_terminal_cutting_long_titles_once_and_ids_never():
    long_id = "contract-2024-appendix-b-clause-17-subsection-4"
    title = "An exceptionally long clause title about indemnification " * 3
    document = Document(long_id, "text", title=title)
    response = SearchResponse(
        query="indemnification",
        results=[SearchResult(1, Candidate(document, rank=2, fused_score=0.03, bm25_score=1.5), 0.9)],
        timings=StageTimings(total_ms=12.0),
        candidates=1,
    )
    console = Console(width=120, file=io.StringIO())
    console.print(results_table(response, width=console.width))
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert all(len(line) <= 120 for line in lines)
    [row] = [line for line in lines if long_id in line]  # the id whole, on one line
    assert row.count("…") == 1
    assert "An exception" in row


def test_readme_documents_every_client_setting():
    rows = "\n".join(settings_table(ClientSettings).splitlines()[2:])
    assert rows in README.read_text(), "README's client settings are stale: paste `python -m client.settings`"


def test_eval_json_lines_give_one_configuration_per_line():
    configuration = ConfigurationResult("bm25", "BM25", {"ndcg@10": 0.5}, {"total": {"p50": 1.0, "p95": 2.0}})
    report = EvalReport(
        dataset="data",
        documents=10,
        queries=2,
        retriever="embedded retriever",
        reranker="tiny",
        engine="torch fp32 on cpu",
        embedding_model="minilm",
        candidates=5,
        configurations=[configuration, replace(configuration, key="dense", label="dense")],
    )
    records = [json.loads(line) for line in eval_lines(report)]
    assert [record["key"] for record in records] == ["bm25", "dense"]
    assert all(record["dataset"] == "data" and record["quality"] == {"ndcg@10": 0.5} for record in records)


def test_tables_print_queries_titles_ids_and_names_as_given_not_as_markup():
    document = Document("x[/i]", "text", title="The [citation needed] claim :cat:")
    response = SearchResponse(
        query="what does [/b] mean",
        results=[SearchResult(1, Candidate(document, rank=1, fused_score=0.03), None)],
        timings=StageTimings(total_ms=12.0),
        candidates=1,
    )
    configuration = ConfigurationResult(
        "bm25", "BM25 [b]", {"ndcg@10": 0.5, "mrr@10": 0.5, "recall@100": 1.0}, {}
    )
    report = EvalReport(
        dataset="data[/red]",
        documents=10,
        queries=2,
        retriever="embedded retriever",
        reranker="tiny",
        engine="torch fp32 on cpu",
        embedding_model="minilm [int8]",
        candidates=5,
        configurations=[configuration],
    )
    console = Console(width=200, file=io.StringIO())
    console.print(results_table(response, width=console.width))
    console.print(report_table(report))
    printed = console.file.getvalue()  # type: ignore[attr-defined]
    for text in (
        "'what does [/b] mean'",
        "x[/i]",
        "The [citation needed] claim :cat:",
        "data[/red]",
        "BM25 [b]",
    ):
        assert text in printed
    assert "minilm [int8]" in " ".join(printed.split())
