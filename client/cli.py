"""The ``rerank-client`` console script: ``ingest`` a corpus, ``search`` with both stages."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from client.documents import count_records, read_documents
from client.ingest import ingest
from client.pipeline import PipelineOptions, RerankFailed, SearchResponse, TwoStagePipeline
from client.retrieval.base import Retriever
from client.retrieval.elasticsearch import ElasticsearchRetriever
from client.retrieval.embedded import EmbeddedRetriever
from client.settings import ClientSettings, add_settings_arguments, settings_from
from client.sidecar import AsyncRerankClient, RerankClient, TlsConfig


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rerank-client",
        description="Hybrid retrieval streamed into the reranking sidecar. Every setting is also an "
        "environment variable (shown in brackets); a flag wins over its variable.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    ingest_parser = commands.add_parser("ingest", help="Embed and index a JSONL file or a BEIR directory.")
    ingest_parser.add_argument("source", type=Path, help="A JSONL file, or a BEIR dataset directory.")
    search_parser = commands.add_parser("search", help="Retrieve, rerank and print the top results.")
    search_parser.add_argument("query")
    for command_parser in (ingest_parser, search_parser):
        add_settings_arguments(command_parser, environ)
    return parser


def make_retriever(settings: ClientSettings) -> Retriever:
    if settings.es_url:
        return ElasticsearchRetriever.from_url(
            settings.es_url,
            settings.es_index,
            api_key=settings.es_api_key,
            ca_certs=settings.es_ca_certs,
            vector_index=settings.es_vector_index,
        )
    return EmbeddedRetriever(settings.index_dir)


def tls_config(settings: ClientSettings) -> TlsConfig | None:
    paths = (settings.tls_root_certs, settings.tls_client_cert, settings.tls_client_key)
    if not any(paths):
        return None
    root, cert, key = (Path(path) if path else None for path in paths)
    return TlsConfig(root_certs=root, client_cert=cert, client_key=key)


def run_ingest(settings: ClientSettings, retriever: Retriever, source: Path, console: Console) -> int:
    progress = Progress(
        TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    )
    with (
        RerankClient(settings.target, timeout=settings.timeout, tls=tls_config(settings)) as client,
        progress,
    ):
        task = progress.add_task("ingest", total=count_records(source))
        report = ingest(
            read_documents(source),
            retriever,
            lambda texts: client.embed(texts).vectors,
            batch_size=settings.embed_batch_size,
            on_progress=lambda done: progress.advance(task, done),
        )
    created = "created" if report.created_index else "updated"
    console.print(f"{report.indexed} documents indexed ({created} the index; it holds {retriever.count()}).")
    if not report.rejected:
        return 0
    table = Table("id", "reason", title=f"{len(report.rejected)} documents rejected")
    for rejected in report.rejected:
        table.add_row(rejected.id, rejected.reason)
    console.print(table)
    return 1


async def run_search(settings: ClientSettings, retriever: Retriever, query: str, console: Console) -> int:
    options = PipelineOptions(
        candidates=settings.candidates,
        batch_size=settings.batch_size,
        top_k=settings.top_k,
        mode=settings.mode,  # type: ignore[arg-type]  # argparse checked the choices
        fusion=settings.fusion,  # type: ignore[arg-type]
        rank_constant=settings.rank_constant,
        bm25_weight=settings.bm25_weight,
        vector_weight=settings.vector_weight,
        num_candidates=settings.num_candidates,
        embed_timeout=settings.timeout,
        rerank_timeout=settings.timeout,
        strict=settings.strict,
    )
    async with AsyncRerankClient(
        settings.target, timeout=settings.timeout, tls=tls_config(settings)
    ) as client:
        pipeline = TwoStagePipeline(retriever, client, options=options)
        try:
            response = await pipeline.search(query, filters=settings.filter_map)
        except RerankFailed as exc:
            console.print(f"[red]{exc}[/red]")
            return 1
    console.print(results_table(response))
    return 0


def results_table(response: SearchResponse) -> Table:
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
    for column in ("#", "id", "title / text", "stage 1", "BM25", "vector", "fused", "rerank"):
        table.add_column(column, justify="left" if column in ("id", "title / text") else "right")
    for result in response.results:
        candidate = result.candidate
        document = candidate.document
        table.add_row(
            str(result.rank),
            document.id,
            (document.title or document.text)[:60],
            str(candidate.rank),
            _score(candidate.bm25_score),
            _score(candidate.vector_score),
            _score(candidate.fused_score),
            _score(result.rerank_score),
        )
    return table


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(os.environ)
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = Console()
    retriever = make_retriever(settings)
    try:
        if args.command == "ingest":
            return run_ingest(settings, retriever, args.source, console)
        return asyncio.run(run_search(settings, retriever, args.query, console))
    finally:
        retriever.close()


if __name__ == "__main__":
    sys.exit(main())
