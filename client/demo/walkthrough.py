"""``rerank-client demo``: both stages on the packaged contract clauses, with nothing running beforehand.

It starts a sidecar (unless given one), ingests the clauses into a temporary embedded index, answers the
golden questions and prints each answer's top results with their stage-1 and stage-2 scores and timings.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from importlib.resources import as_file, files
from pathlib import Path

from rich.console import Console
from rich.table import Table

from client.documents import Document, Rejected, read_jsonl
from client.ingest import ingest
from client.local_sidecar import EMBEDDING_MODEL, local_sidecar
from client.pipeline import PipelineOptions, SearchResponse, TwoStagePipeline
from client.retrieval.embedded import EmbeddedRetriever
from client.settings import DemoSettings
from client.sidecar_client import AsyncRerankClient, RerankClient

DATA = files("client.demo")


@dataclass(frozen=True)
class GoldenQuestion:
    question: str
    expected: frozenset[str]  # clause ids; any of them in the top results answers the question
    no_keyword_overlap: bool = False


@dataclass(frozen=True)
class Answer:
    golden: GoldenQuestion
    response: SearchResponse

    @property
    def found(self) -> bool:
        return any(result.candidate.id in self.golden.expected for result in self.response.results)


@dataclass(frozen=True)
class DemoReport:
    answers: list[Answer]
    sidecar: str  # the target used (started by the demo unless given)
    reranker: str
    startup_ms: float
    ingest_ms: float

    @property
    def found(self) -> int:
        return sum(answer.found for answer in self.answers)


def load_clauses() -> list[Document]:
    with as_file(DATA.joinpath("clauses.jsonl")) as path:
        records = list(read_jsonl(path))
    rejected = [record for record in records if isinstance(record, Rejected)]
    if rejected:
        raise ValueError(f"packaged clause {rejected[0].id} is invalid: {rejected[0].reason}")
    return [record for record in records if isinstance(record, Document)]


def load_golden() -> list[GoldenQuestion]:
    golden = json.loads(DATA.joinpath("golden.json").read_text(encoding="utf-8"))
    return [
        GoldenQuestion(item["question"], frozenset(item["expected"]), item.get("no_keyword_overlap", False))
        for item in golden["questions"]
    ]


def run_demo(settings: DemoSettings, console: Console) -> DemoReport:
    clauses, questions = load_clauses(), load_golden()
    started = time.perf_counter()
    with _sidecar(settings, console) as target, tempfile.TemporaryDirectory() as index_dir:
        startup_ms = _ms_since(started)
        retriever = EmbeddedRetriever(Path(index_dir))
        started = time.perf_counter()
        with RerankClient(target, timeout=settings.timeout) as client:
            report = ingest(clauses, retriever, lambda texts: client.embed(texts).vectors)
            reranker = client.info().model_id
        ingest_ms = _ms_since(started)
        if report.rejected:
            raise RuntimeError(f"clause {report.rejected[0].id} was refused: {report.rejected[0].reason}")
        contracts = len({clause.metadata["contract"] for clause in clauses})
        console.print(f"Ingested {report.indexed} clauses of {contracts} contracts in {ingest_ms:.0f} ms.\n")
        answers = asyncio.run(_answer(target, retriever, questions, settings))
    demo = DemoReport(answers, target, reranker, startup_ms, ingest_ms)
    for answer in answers:
        console.print(answer_table(answer, clauses_by_id={clause.id: clause for clause in clauses}))
    console.print(summary_table(demo, settings.top_k))
    return demo


@contextmanager
def _sidecar(settings: DemoSettings, console: Console) -> Iterator[str]:
    """The given sidecar, or one started here (and stopped on the way out)."""
    if settings.target:
        yield settings.target
        return
    with ExitStack() as stack:
        with console.status(f"Starting a sidecar: {settings.model} reranks, {EMBEDDING_MODEL} embeds..."):
            target = stack.enter_context(
                local_sidecar(settings.model, startup_timeout=settings.startup_timeout)
            )
        console.print(f"Sidecar ready on {target}.")
        yield target


async def _answer(
    target: str, retriever: EmbeddedRetriever, questions: Sequence[GoldenQuestion], settings: DemoSettings
) -> list[Answer]:
    options = PipelineOptions(
        candidates=settings.candidates,
        top_k=settings.top_k,
        embed_timeout=settings.timeout,
        rerank_timeout=settings.timeout,
        strict=True,  # the demo shows reranking: a failure must say so rather than fall back silently
    )
    async with AsyncRerankClient(target, timeout=settings.timeout) as sidecar:
        pipeline = TwoStagePipeline(retriever, sidecar, options=options)
        return [Answer(golden, await pipeline.search(golden.question)) for golden in questions]


def answer_table(answer: Answer, clauses_by_id: dict[str, Document]) -> Table:
    response = answer.response
    timings = response.timings
    table = Table(
        title=f"{response.query}",
        title_justify="left",
        caption=f"{response.candidates} stage-1 candidates; embed {timings.embed_ms:.0f} ms, retrieval "
        f"{timings.retrieval_ms:.0f} ms, rerank {timings.rerank_ms:.0f} ms, total {timings.total_ms:.0f} ms. "
        f"Expected: {', '.join(sorted(answer.golden.expected))}.",
        caption_justify="left",
    )
    for column in ("#", "clause", "contract", "title", "stage 1", "BM25", "vector", "RRF", "rerank", ""):
        table.add_column(column, justify="left" if column in ("clause", "contract", "title") else "right")
    for result in response.results:
        candidate = result.candidate
        clause = clauses_by_id[candidate.id]
        table.add_row(
            str(result.rank),
            candidate.id,
            str(clause.metadata.get("contract", "")),
            clause.title,
            f"#{candidate.rank}",
            _score(candidate.bm25_score),
            _score(candidate.vector_score),
            _score(candidate.fused_score),
            _score(result.rerank_score),
            "[green]expected[/green]" if candidate.id in answer.golden.expected else "",
        )
    return table


def summary_table(demo: DemoReport, top_k: int) -> Table:
    table = Table(
        title=f"Golden questions: {demo.found} of {len(demo.answers)} "
        f"with an expected clause in the top {top_k}",
        caption=f"Reranker: {demo.reranker}. Sidecar start {demo.startup_ms / 1000:.1f} s, "
        f"ingest {demo.ingest_ms:.0f} ms.",
    )
    # Where the best expected clause in the final top k stood in stage 1, and where reranking put it.
    for column in ("question", "found", "stage-1 rank", "final rank", "total ms"):
        table.add_column(column, justify="left" if column == "question" else "right")
    for answer in demo.answers:
        expected = [
            result for result in answer.response.results if result.candidate.id in answer.golden.expected
        ]
        table.add_row(
            answer.golden.question + (" (no shared keyword)" if answer.golden.no_keyword_overlap else ""),
            "yes" if answer.found else "[red]no[/red]",
            f"#{min(result.candidate.rank for result in expected)}" if expected else "-",
            f"#{min(result.rank for result in expected)}" if expected else "-",
            f"{answer.response.timings.total_ms:.0f}",
        )
    return table


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
