"""What ``search`` and ``eval`` print: a table that fits the terminal, one JSON document, or JSON Lines."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from rich.table import Table
from rich.text import Text

from client.evaluation.report import EvalReport
from client.pipeline import SearchResponse, SearchResult


def output_format(setting: str) -> str:
    """``--format``: ``auto`` is a table for a person at a terminal, JSON for a script reading a pipe."""
    if setting != "auto":
        return setting
    return "table" if sys.stdout.isatty() else "json"


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


def results_table(response: SearchResponse, *, width: int, explain: bool = False) -> Table:
    """The results in ``width`` columns: ids and scores whole, each title cut once (an ellipsis) to the width
    they leave. With ``explain``, a column says why a result was not reranked."""
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
    headers = ["#", "id", "title / text", "stage 1", "BM25", "vector", "fused", "rerank"]
    rows = [
        [
            str(result.rank),
            result.candidate.id,
            " ".join((result.candidate.document.title or result.candidate.document.text).split()),
            str(result.candidate.rank),
            _score(result.candidate.bm25_score),
            _score(result.candidate.vector_score),
            _score(result.candidate.fused_score),
            _score(result.rerank_score),
        ]
        for result in response.results
    ]
    fixed = [max([len(header), *(len(row[column]) for row in rows)]) for column, header in enumerate(headers)]
    flexible = 2 if explain else 1  # the titles, and the reasons
    # Each column has a space either side and a border on its left, the table a border on its right.
    left = width - (sum(fixed) - fixed[TITLE]) - 3 * (len(headers) + flexible - 1) - 1
    title_width = max(MIN_TITLE_WIDTH, left // flexible)
    # Text, not str: rich would read brackets in a query, title or id as markup and ":name:" as an emoji.
    table = Table(
        title=Text(repr(response.query), style="table.title"), caption=Text(caption, style="table.caption")
    )
    for column, header in enumerate(headers):
        if column == TITLE:
            table.add_column(header, no_wrap=True, max_width=title_width)
        else:
            justify = "left" if header == "id" else "right"
            table.add_column(header, justify=justify, no_wrap=True, min_width=fixed[column])
    if explain:
        table.add_column("not reranked because", max_width=max(MIN_TITLE_WIDTH, left - title_width))
    for row in rows:
        row[TITLE] = _cut(row[TITLE], title_width)
        if explain:
            row.append(response.not_reranked.reason if response.not_reranked else "")
        table.add_row(*map(Text, row))
    return table


TITLE = 2  # the column of titles in ``results_table``
MIN_TITLE_WIDTH = 12


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# ---- eval ---------------------------------------------------------------------------------------------


def eval_lines(report: EvalReport) -> Iterator[str]:
    """One JSON object per configuration, each with the run's dataset, retriever and models."""
    summary = {
        key: value for key, value in report.to_json().items() if key not in ("configurations", "sweep")
    }
    for configuration in report.configurations:
        yield json.dumps({**summary, **asdict(configuration)})
