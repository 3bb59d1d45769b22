"""What ``search`` and ``eval`` print: a table that fits the terminal, one JSON document, or JSON Lines."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, TextIO

from rich.table import Table

from client.evaluation import EvalReport
from client.pipeline import SearchResponse, SearchResult

FORMATS = ("table", "json", "jsonl")


def output_format(setting: str, stdout: TextIO = sys.stdout) -> str:
    """``--format``: ``auto`` is a table for a person at a terminal, JSON for a script reading a pipe."""
    if setting != "auto":
        return setting
    return "table" if stdout.isatty() else "json"


# ---- search -------------------------------------------------------------------------------------------


def search_json(response: SearchResponse, *, explain: bool = False) -> dict[str, Any]:
    """The whole response: the query, whether and by which model it was reranked, timings, and the results."""
    return {
        "query": response.query,
        "reranked": response.reranked,
        "not_reranked_reason": response.not_reranked.reason if response.not_reranked else None,
        "model_id": response.model_id or None,
        "candidates": response.candidates,
        "notes": list(response.notes),
        "timings_ms": asdict(response.timings),
        "results": [result_json(result, response, explain=explain) for result in response.results],
    }


def search_lines(response: SearchResponse, *, explain: bool = False) -> Iterator[str]:
    """One JSON object per result, each with its query and the search's timings, so a line stands alone."""
    for result in response.results:
        record = {"query": response.query, **result_json(result, response, explain=explain)}
        yield json.dumps({**record, "timings_ms": asdict(response.timings)})


def result_json(result: SearchResult, response: SearchResponse, *, explain: bool = False) -> dict[str, Any]:
    candidate = result.candidate
    record: dict[str, Any] = {
        "rank": result.rank,
        "id": candidate.id,
        "title": candidate.document.title,
        "stage1_rank": candidate.rank,
        "bm25_rank": candidate.bm25_rank,
        "vector_rank": candidate.vector_rank,
        "bm25_score": candidate.bm25_score,
        "vector_score": candidate.vector_score,
        "fused_score": candidate.fused_score,
        "rerank_score": result.rerank_score,
        "reranked": result.rerank_score is not None,
    }
    if explain:
        record["not_reranked_reason"] = response.not_reranked.reason if response.not_reranked else None
    return record


def results_table(response: SearchResponse, *, explain: bool = False) -> Table:
    """Ids are never cut; the title column takes the width left and cuts a long title once (an ellipsis)."""
    timings = response.timings
    caption = (
        f"{response.candidates} candidates; embed {timings.embed_ms:.0f} ms, "
        f"first page {timings.first_page_ms:.0f} ms, retrieval {timings.retrieval_ms:.0f} ms, "
        f"rerank {timings.rerank_ms:.0f} ms (overlapping), "
        f"total {timings.total_ms:.0f} ms"
    )
    if response.not_reranked:
        caption += f"\nNOT RERANKED, stage-1 order: {response.not_reranked.reason}"
    caption += "".join(f"\n{note}" for note in response.notes)
    table = Table(title=f"{response.query!r}", caption=caption)
    ids = [result.candidate.id for result in response.results]
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("id", no_wrap=True, min_width=max(map(len, ids), default=2))
    table.add_column("title / text", no_wrap=True, overflow="ellipsis", ratio=1)
    for column in ("stage 1", "BM25", "vector", "fused", "rerank"):
        table.add_column(column, justify="right", no_wrap=True)
    if explain:
        table.add_column("not reranked because", overflow="fold")
    for result in response.results:
        candidate = result.candidate
        document = candidate.document
        cells = [
            str(result.rank),
            document.id,
            " ".join((document.title or document.text).split()),
            str(candidate.rank),
            _score(candidate.bm25_score),
            _score(candidate.vector_score),
            _score(candidate.fused_score),
            _score(result.rerank_score),
        ]
        if explain:
            cells.append(response.not_reranked.reason if response.not_reranked else "")
        table.add_row(*cells)
    return table


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# ---- eval ---------------------------------------------------------------------------------------------


def eval_lines(report: EvalReport) -> Iterator[str]:
    """One JSON object per configuration, each with the run's dataset, retriever and models."""
    summary = {key: value for key, value in report.to_json().items() if key != "configurations"}
    for configuration in report.configurations:
        yield json.dumps({**summary, **asdict(configuration)})
