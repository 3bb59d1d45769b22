"""The commands of ``rerank-client`` (entered through ``client.__main__``): ``ingest`` a corpus, ``search``
with both stages, ``eval`` them on a BEIR dataset, or run the packaged ``demo``."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NoReturn

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from client.demo.walkthrough import run_demo
from client.documents import count_records, documents_file, read_documents
from client.embedding_cache import EmbeddingCache
from client.errors import (
    DOCUMENTS_REJECTED,
    USAGE,
    ClientError,
    InputInvalid,
    InputMissing,
    SidecarError,
    UsageError,
)
from client.evaluation.datasets import BeirDataset, load_beir, prepare_index, workspace_name
from client.evaluation.report import (
    EvalReport,
    configuration_labels,
    engine_description,
    fusion_description,
    lossy_embedder_warning,
    report_table,
    reranker_description,
    summarize,
    write_plot,
)
from client.evaluation.runner import BLEND, Evaluator, QueryRun
from client.evaluation.sweep import SweepPoint, collect_legs, sweep, sweep_table
from client.ingest import ingest
from client.output import eval_lines, output_format, results_table, search_json, search_lines
from client.pipeline import PipelineOptions, TwoStagePipeline
from client.retrieval.base import Retriever
from client.retrieval.elasticsearch import ElasticsearchRetriever
from client.retrieval.embedded import EmbeddedRetriever
from client.settings import EVAL_IGNORES, ClientSettings, DemoSettings, EvalSettings
from client.sidecar_client import AsyncRerankClient, RerankClient, TlsConfig
from envflags import add_settings_arguments, settings_from
from rerank.v1 import rerank_pb2


class _Parser(argparse.ArgumentParser):
    """Reports a usage error in one line on stderr, as every other failure is, instead of the usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


COMMANDS = ("ingest", "search", "eval", "demo")


def build_parser(environ: Mapping[str, str], command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser, its flags defaulting to ``environ``'s variables. Given the ``command``
    about to run, only its parser reads them: a variable only another command reads cannot fail it."""
    parser = _Parser(
        prog="rerank-client",
        description="Hybrid retrieval streamed into the reranking sidecar. Every setting is also an "
        "environment variable (shown in brackets); a flag wins over its variable.",
    )

    def environ_of(name: str) -> Mapping[str, str]:
        return environ if command in (None, name) else {}

    commands = parser.add_subparsers(dest="command", required=True)
    ingest_parser = commands.add_parser("ingest", help="Embed and index a JSONL file or a BEIR directory.")
    ingest_parser.add_argument("source", type=Path, help="A JSONL file, or a BEIR dataset directory.")
    search_parser = commands.add_parser("search", help="Retrieve, rerank and print the top results.")
    search_parser.add_argument("query")
    for name, command_parser in (("ingest", ingest_parser), ("search", search_parser)):
        add_settings_arguments(command_parser, ClientSettings, environ_of(name))
    eval_parser = commands.add_parser(
        "eval",
        help="Measure BM25, dense, hybrid and hybrid + rerank on a BEIR dataset: quality and latency.",
    )
    eval_parser.add_argument(
        "dataset", type=Path, help="A BEIR directory: corpus.jsonl, queries.jsonl, qrels/."
    )
    add_settings_arguments(eval_parser, ClientSettings, environ_of("eval"), exclude=EVAL_IGNORES)
    add_settings_arguments(eval_parser, EvalSettings, environ_of("eval"))
    demo_parser = commands.add_parser(
        "demo", help="Answer questions about the packaged contract clauses with both stages, offline."
    )
    add_settings_arguments(demo_parser, DemoSettings, environ_of("demo"))
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


def blocking_client(settings: ClientSettings) -> RerankClient:
    return RerankClient(settings.target, **_connection_options(settings))


def async_client(settings: ClientSettings) -> AsyncRerankClient:
    return AsyncRerankClient(settings.target, **_connection_options(settings))


def _connection_options(settings: ClientSettings) -> dict[str, Any]:
    """How either client connects: its timeout, TLS and bearer token."""
    return {
        "timeout": settings.timeout,
        "tls": tls_config(settings),
        "token": settings.token,
        "allow_insecure_token": settings.allow_insecure_token,
    }


def progress_bars(console: Console) -> Progress:
    """Bars for a person watching a terminal; nothing where the console is a file or a pipe."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )


def embedding_model_of(info: rerank_pb2.InfoResponse, target: str) -> rerank_pb2.EmbeddingModelInfo:
    """The embedding model a sidecar's Info reports; refused before any work when it serves none."""
    if not info.HasField("embedding_model"):
        raise SidecarError(
            f"the sidecar at {target} serves no embedding model: start it with --embed-model",
            grpc.StatusCode.UNIMPLEMENTED,
            "Info reports no embedding model",
        )
    return info.embedding_model


def run_ingest(
    settings: ClientSettings, retriever: Retriever, source: Path, out: Console, err: Console
) -> int:
    total = count_records(source)  # a missing or unreadable file fails here, before the sidecar is called
    if not total:
        raise InputInvalid(f"{documents_file(source)} holds no records: give one JSON object per line")
    progress = progress_bars(err)
    with blocking_client(settings) as client, progress:
        embedding = embedding_model_of(client.info(), client.target)
        task = progress.add_task("ingest", total=total)
        report = ingest(
            read_documents(source),
            retriever,
            lambda texts: client.embed(texts).vectors,
            batch_size=settings.embed_batch_size,
            embedding_model=embedding.model_id,
            on_progress=lambda done: progress.advance(task, done),
        )
    if report.indexed or report.created_index:
        created = "created" if report.created_index else "updated"
        out.print(f"{report.indexed} documents indexed ({created} the index; it holds {retriever.count()}).")
    else:  # nothing reached the index, which may not exist: it was neither created nor updated
        out.print("No documents indexed: every record was refused.")
    if not report.rejected:
        return 0
    table = Table("id", "reason", title=f"{len(report.rejected)} documents rejected")
    for rejected in report.rejected:
        table.add_row(Text(rejected.id), Text(rejected.reason))  # not markup
    out.print(table)
    return DOCUMENTS_REJECTED


def pipeline_options(settings: ClientSettings) -> PipelineOptions:
    return PipelineOptions(
        candidates=settings.candidates,
        batch_size=settings.batch_size,
        top_k=settings.top_k,
        mode=settings.mode,  # type: ignore[arg-type]  # argparse checked the choices
        fusion=settings.fusion,  # type: ignore[arg-type]
        fusion_method=settings.fusion_method,  # type: ignore[arg-type]
        rank_constant=settings.rank_constant,
        bm25_weight=settings.bm25_weight,
        vector_weight=settings.vector_weight,
        convex_weight=settings.convex_weight,
        normalization=settings.normalization,  # type: ignore[arg-type]
        title_boost=settings.title_boost,
        num_candidates=settings.num_candidates,
        rerank_blend=settings.rerank_blend,
        embed_timeout=settings.timeout,
        rerank_timeout=settings.timeout,
        strict=settings.strict,
    )


async def run_search(settings: ClientSettings, retriever: Retriever, query: str, out: Console) -> int:
    async with async_client(settings) as client:
        pipeline = TwoStagePipeline(retriever, client, options=pipeline_options(settings))
        response = await pipeline.search(query, filters=settings.filter_map)
    output = output_format(settings.format)
    if output == "table":
        out.print(results_table(response, width=out.width, explain=settings.explain))
    elif output == "json":
        print(json.dumps(search_json(response, explain=settings.explain), indent=2))
    else:
        for line in search_lines(response, explain=settings.explain):
            print(line)
    return 0


def run_eval(
    settings: ClientSettings, eval_settings: EvalSettings, source: Path, out: Console, err: Console
) -> int:
    for flag, path in (("--output", eval_settings.output), ("--plot", eval_settings.plot)):
        if path and not Path(path).parent.is_dir():  # found now, not after the whole run
            raise InputMissing(f"{flag} {path}: the directory {Path(path).parent} does not exist; create it")
    if BLEND in eval_settings.configurations and settings.rerank_blend == 1.0:
        raise UsageError(
            "--configs blend needs --rerank-blend (RERANK_CLIENT_RERANK_BLEND) below 1: at 1 it is the "
            "rerank configuration"
        )
    dataset = load_beir(source, eval_settings.split)
    queries = dict(itertools.islice(dataset.queries.items(), eval_settings.max_queries or None))
    with blocking_client(settings) as client:
        info = client.info()
        embedding = embedding_model_of(info, client.target)
        workspace = Path(eval_settings.eval_dir) / workspace_name(dataset, embedding)
        retriever = make_retriever(
            replace(settings, index_dir=str(workspace / "index"), es_index=f"rerank-eval-{workspace.name}")
        )
        try:
            with progress_bars(err) as progress:
                documents = count_records(dataset.directory)
                embedded = progress.add_task("embed", total=documents)
                indexed = progress.add_task("index", total=documents)
                ingested = prepare_index(
                    dataset,
                    retriever,
                    lambda texts: client.embed(texts).vectors,
                    EmbeddingCache(workspace / "embeddings"),
                    dims=embedding.dims,
                    embedding_model=embedding.model_id,
                    batch_size=settings.embed_batch_size,
                    on_embedded=lambda done: progress.advance(embedded, done),
                    on_indexed=lambda done: progress.advance(indexed, done),
                )
                if ingested is None:
                    progress.update(embedded, completed=documents, description="embed (saved)")
                    progress.update(indexed, completed=documents, description="index (already built)")
            if ingested is not None and ingested.rejected:
                first = ingested.rejected[0]
                err.print(
                    Text(
                        f"{len(ingested.rejected)} documents rejected, first: {first.id}: {first.reason}",
                        style="yellow",
                    )
                )
            warnings = [warning] if (warning := lossy_embedder_warning(embedding)) else []
            for warning in warnings:
                err.print(Text(f"warning: {warning}", style="yellow"))
            options = pipeline_options(settings)
            runs, swept = asyncio.run(_run_queries(settings, eval_settings, retriever, queries, dataset, err))
            reranker = reranker_description(info)
            labels = configuration_labels(
                settings.candidates, info, fusion_description(options), settings.rerank_blend
            )
            report = EvalReport(
                dataset=dataset.name,
                documents=retriever.count(),
                queries=len(queries),
                retriever=f"Elasticsearch index {retriever.index}"
                if isinstance(retriever, ElasticsearchRetriever)
                else "embedded retriever",
                reranker=reranker,
                engine=engine_description(info),
                embedding_model=f"{embedding.model_id} ({embedding.engine} {embedding.precision})",
                candidates=settings.candidates,
                configurations=summarize(
                    dataset.qrels, runs, {key: labels[key] for key in eval_settings.configurations}
                ),
                split=eval_settings.split,
                fusion=fusion_description(options),
                concurrency=eval_settings.concurrency,
                warnings=warnings,
                sweep=[asdict(point) for point in swept],
            )
        finally:
            retriever.close()
    output = output_format(settings.format)
    if output == "table":
        out.print(report_table(report))
        if swept:
            out.print(sweep_table(swept, eval_settings.split))
    elif output == "json":
        print(json.dumps(report.to_json(), indent=2))
    else:
        for line in eval_lines(report):
            print(line)
    if eval_settings.output:
        Path(eval_settings.output).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        err.print(Text(f"Report: {eval_settings.output}"))
    if eval_settings.plot:
        write_plot(report, Path(eval_settings.plot))
        err.print(Text(f"Chart: {eval_settings.plot}"))
    return 0


async def _run_queries(
    settings: ClientSettings,
    eval_settings: EvalSettings,
    retriever: Retriever,
    queries: Mapping[str, str],
    dataset: BeirDataset,
    err: Console,
) -> tuple[dict[str, dict[str, QueryRun]], list[SweepPoint]]:
    """Every query's runs of the chosen configurations, and with --sweep the fusion grid's quality."""
    options = pipeline_options(settings)
    async with async_client(settings) as client:
        evaluator = Evaluator(
            retriever, client, options, eval_settings.configurations, eval_settings.concurrency
        )
        with progress_bars(err) as progress:
            task = progress.add_task("queries", total=len(queries))
            runs = await evaluator.run_all(queries, lambda: progress.advance(task))
            if not eval_settings.sweep:
                return runs, []
            task = progress.add_task("sweep: legs", total=len(queries))
            legs = await collect_legs(
                retriever,
                client,
                options,
                queries,
                evaluator.depth,
                concurrency=eval_settings.concurrency,
                on_query=lambda: progress.advance(task),
            )
    return runs, sweep(dataset.qrels, legs)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(os.environ, next((arg for arg in argv if arg in COMMANDS), None))
    args = parser.parse_args(argv)
    try:
        # Each command's parser holds the flags of the settings it uses; the others keep their defaults.
        settings = settings_from(args, ClientSettings)
        eval_settings = settings_from(args, EvalSettings)
        demo_settings = settings_from(args, DemoSettings)
    except ValueError as exc:
        command = f"{parser.prog} {args.command}"
        print(f"{command}: error: {exc} (see {command} --help)", file=sys.stderr)
        return USAGE
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    debug = demo_settings.debug if args.command == "demo" else settings.debug
    if not debug:
        # Its retry warnings carry tracebacks; the failure they end in is reported in one line below.
        logging.getLogger("elastic_transport").setLevel(logging.ERROR)
    try:
        return run_command(args, settings, eval_settings, demo_settings)
    except ClientError as exc:
        # The one place a failure becomes its line on stderr and its exit code.
        if debug:
            traceback.print_exc()
        message = " ".join(str(exc).split())
        print(f"{parser.prog} {args.command}: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{parser.prog} {args.command}: interrupted", file=sys.stderr)
        return 130


def run_command(
    args: argparse.Namespace,
    settings: ClientSettings,
    eval_settings: EvalSettings,
    demo_settings: DemoSettings,
) -> int:
    out, err = Console(), Console(stderr=True)
    if args.command == "demo":
        run_demo(demo_settings, out)
        return 0
    if args.command == "eval":
        return run_eval(settings, eval_settings, args.dataset, out, err)
    retriever = make_retriever(settings)
    try:
        if args.command == "ingest":
            return run_ingest(settings, retriever, args.source, out, err)
        return asyncio.run(run_search(settings, retriever, args.query, out))
    finally:
        retriever.close()
