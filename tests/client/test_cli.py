"""``rerank-client`` end to end: ingest and search with the real embedder (MiniLM) in the sidecar."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from client.cli import build_parser, main
from client.settings import ClientSettings, parse_filters, settings_from
from tests.conftest import RunningSidecar

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
    searched = await asyncio.to_thread(main, ["search", "what do cats eat", *common, "--filters", "kind=pet"])
    search_output = capsys.readouterr().out

    assert (ingested, rerun) == (1, 1)  # one document rejected, each time
    assert "broken" in ingest_output
    assert "it holds 3" in ingest_output  # the rerun updated, not duplicated
    assert searched == 0
    assert "cats" in search_output
    assert "kittens" in search_output
    assert "stocks" not in search_output  # filtered out on both legs
    assert "NOT RERANKED" not in search_output


def test_settings_come_from_flags_then_environment():
    parser = build_parser(
        {"ES_URL": "http://es:9200", "RERANK_CLIENT_TOP_K": "3", "RERANK_CLIENT_STRICT": "true"}
    )
    settings = settings_from(parser.parse_args(["search", "q", "--top-k", "5"]))
    assert (settings.es_url, settings.top_k, settings.strict) == ("http://es:9200", 5, True)
    assert parse_filters("lang=en, lang=de,year=2020") == {"lang": ["en", "de"], "year": "2020"}
    with pytest.raises(ValueError, match="name=value"):
        ClientSettings(filters="lang")
