"""``rerank-client eval``: ranking quality and latency of each stage on a BEIR dataset.

Every judged query runs four configurations: BM25 only, dense only, hybrid RRF, and hybrid RRF with the top N
reranked by the sidecar. Metrics come from ir-measures (pytrec_eval underneath), imported only here, when
an evaluation runs, as is matplotlib for the chart.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from client.documents import Document, Rejected, read_documents, read_jsonl
from client.embedding_cache import EmbeddingCache
from client.errors import InputInvalid, InputMissing, unreadable
from client.ingest import IngestReport, ingest
from client.pipeline import PipelineOptions, TwoStagePipeline
from client.retrieval.base import Mode, Retriever, SearchRequest
from client.sidecar_client import AsyncRerankClient
from rerank.v1 import rerank_pb2

RECALL_DEPTH = 100  # Recall@100 needs every configuration to rank at least this many documents
MEASURE_NAMES = ("ndcg@10", "mrr@10", "recall@100")
STAGES = ("embed", "retrieval", "rerank", "total")
BM25, DENSE, HYBRID, RERANK = "bm25", "dense", "hybrid", "rerank"


# ---- the dataset --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BeirDataset:
    directory: Path
    queries: dict[str, str]  # the judged queries of the split, in queries.jsonl order
    qrels: dict[str, dict[str, int]]  # query id -> document id -> relevance
    fingerprint: str  # of corpus.jsonl: an edited corpus gets new embeddings and a new index

    @property
    def name(self) -> str:
        return self.directory.resolve().name


def load_beir(directory: Path, split: str = "test") -> BeirDataset:
    """The queries and qrels of one split of a BEIR-layout directory (its corpus is read when ingesting)."""
    if not directory.exists():
        raise InputMissing(f"{directory} does not exist: give a BEIR dataset directory")
    layout = "a BEIR dataset directory holds corpus.jsonl, queries.jsonl and qrels/SPLIT.tsv"
    if not directory.is_dir():
        raise InputInvalid(f"{directory} is a file, not a dataset: {layout}")
    corpus, queries_path, qrels_path = (
        directory / "corpus.jsonl",
        directory / "queries.jsonl",
        directory / "qrels" / f"{split}.tsv",
    )
    for path in (corpus, queries_path):
        if not path.is_file():
            raise InputInvalid(f"{directory} is not a BEIR dataset, it has no {path.name}: {layout}")
    if not qrels_path.is_file():
        splits = sorted(path.stem for path in (directory / "qrels").glob("*.tsv"))
        raise InputInvalid(
            f"{directory} has no qrels for the split {split!r} ({qrels_path} is missing): "
            + (f"pick one of {', '.join(splits)} with --split" if splits else "add qrels/SPLIT.tsv")
        )
    qrels = _read_qrels(qrels_path)
    queries = {}
    for record in read_jsonl(queries_path):
        if isinstance(record, Rejected):
            raise InputInvalid(f"{queries_path}: {record.id}: {record.reason}")
        if record.id in qrels:
            queries[record.id] = record.text
    if unknown := sorted(set(qrels) - set(queries)):
        raise InputInvalid(
            f"{qrels_path} judges queries missing from queries.jsonl: {', '.join(unknown[:5])}"
        )
    return BeirDataset(directory, queries, qrels, _file_digest(corpus))


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """query id -> document id -> relevance, from a BEIR qrels TSV (header: query-id, corpus-id, score)."""
    qrels: dict[str, dict[str, int]] = {}
    try:
        with path.open(encoding="utf-8", newline="") as rows:
            reader = csv.DictReader(rows, delimiter="\t")
            try:
                for row in reader:
                    qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
            except (KeyError, ValueError, TypeError) as exc:
                raise InputInvalid(
                    f"{path}:{reader.line_num} is not a qrels row ({exc!r}): qrels are tab-separated, with "
                    "the header query-id, corpus-id, score, and integer scores"
                ) from exc
    except OSError as exc:
        raise unreadable(path, "the qrels file", exc) from exc
    if not qrels:
        raise InputInvalid(f"{path} judges no query: add rows of query-id, corpus-id, score")
    return qrels


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while chunk := data.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def workspace_name(dataset: BeirDataset, embedding_model: rerank_pb2.EmbeddingModelInfo) -> str:
    """``scifact-<corpus digest>-<model>-<precision>``: lowercase, so it also serves as an Elasticsearch index
    name. The precision is part of the key: vectors computed at another precision differ slightly."""
    model = re.sub(r"[^a-z0-9]+", "-", f"{embedding_model.model_id}-{embedding_model.precision}".lower())
    model = model.strip("-")
    name = re.sub(r"[^a-z0-9]+", "-", dataset.name.lower()).strip("-")
    return f"{name}-{dataset.fingerprint[:12]}-{model}"


# ---- ingest -------------------------------------------------------------------------------------------


def prepare_index(
    dataset: BeirDataset,
    retriever: Retriever,
    embed: Callable[[Sequence[str]], np.ndarray],
    cache: EmbeddingCache,
    *,
    dims: int,
    embedding_model: str = "",
    batch_size: int,
    on_embedded: Callable[[int], None] = lambda _: None,
    on_indexed: Callable[[int], None] = lambda _: None,
) -> IngestReport | None:
    """Index the corpus unless the index already holds all of it (None then).

    Embeddings come from ``cache`` where it has them; the others are computed and saved there batch by
    batch, so a run interrupted while embedding resumes where it stopped.
    """
    records = list(read_documents(dataset.directory))
    documents = sum(isinstance(record, Document) for record in records)
    retriever.create_index(dims, embedding_model)
    if retriever.count() == documents:
        return None

    def embed_cached(texts: Sequence[str]) -> np.ndarray:
        vectors = cache.embed(texts, embed)
        on_embedded(len(texts))
        return vectors

    return ingest(
        records,
        retriever,
        embed_cached,
        batch_size=batch_size,
        embedding_model=embedding_model,
        on_progress=on_indexed,
    )


# ---- running the queries ------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryRun:
    ranking: list[str]  # document ids, best first
    timings_ms: dict[str, float]  # only the stages the configuration ran


class Evaluator:
    """Runs each configuration for one query after another, one query at a time, so timings do not overlap.

    ``options`` are the pipeline's settings; ``options.candidates`` is N, the depth that gets reranked.
    """

    def __init__(self, retriever: Retriever, sidecar: AsyncRerankClient, options: PipelineOptions) -> None:
        self.retriever = retriever
        self.sidecar = sidecar
        self.options = options
        self.depth = max(RECALL_DEPTH, options.candidates)
        # Strict: a ranking the sidecar failed to rerank must not be scored as reranked.
        self.pipeline = TwoStagePipeline(
            retriever, sidecar, options=replace(options, mode="hybrid", top_k=options.candidates, strict=True)
        )

    async def run(self, query: str) -> dict[str, QueryRun]:
        started = time.perf_counter()
        embeddings = await self.sidecar.embed([query], timeout=self.options.embed_timeout)
        embed_ms = _ms_since(started)
        vector = embeddings.vectors[0]
        runs = {BM25: await self._stage_one(query, "bm25", None, 0.0)}
        # Dense and hybrid share the query's one embedding call: their total is embed + retrieval.
        runs[DENSE] = await self._stage_one(query, "vector", vector, embed_ms)
        runs[HYBRID] = await self._stage_one(query, "hybrid", vector, embed_ms)
        response = await self.pipeline.search(query)
        reranked = [result.candidate.id for result in response.results]
        # Below the top N, the ranking goes on in hybrid order, as a reranked result list would.
        seen = set(reranked)
        rest = [doc_id for doc_id in runs[HYBRID].ranking if doc_id not in seen]
        timings = response.timings
        runs[RERANK] = QueryRun(
            (reranked + rest)[: self.depth],
            {
                "embed": timings.embed_ms,
                "retrieval": timings.retrieval_ms,
                "rerank": timings.rerank_ms,  # overlaps retrieval: candidates stream in page by page
                "total": timings.total_ms,
            },
        )
        return runs

    async def run_all(
        self, queries: Mapping[str, str], on_query: Callable[[], None] = lambda: None
    ) -> dict[str, dict[str, QueryRun]]:
        """Query id -> configuration -> its run."""
        runs = {}
        for query_id, query in queries.items():
            runs[query_id] = await self.run(query)
            on_query()
        return runs

    async def _stage_one(
        self, query: str, mode: Mode, vector: np.ndarray | None, embed_ms: float
    ) -> QueryRun:
        options = self.options
        request = SearchRequest(
            query=query,
            query_vector=vector,
            mode=mode,
            size=self.depth,
            page_size=options.batch_size,
            fusion=options.fusion if mode == "hybrid" else "client",
            rank_constant=options.rank_constant,
            bm25_weight=options.bm25_weight,
            vector_weight=options.vector_weight,
            num_candidates=options.num_candidates,
        )
        started = time.perf_counter()
        ranking = await asyncio.to_thread(_ranked_ids, self.retriever, request)
        retrieval_ms = _ms_since(started)
        timings = {"embed": embed_ms} if vector is not None else {}
        return QueryRun(ranking, {**timings, "retrieval": retrieval_ms, "total": embed_ms + retrieval_ms})


def _ranked_ids(retriever: Retriever, request: SearchRequest) -> list[str]:
    return [candidate.id for page in retriever.candidate_pages(request) for candidate in page]


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


# ---- the report ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigurationResult:
    key: str
    label: str
    quality: dict[str, float]  # MEASURE_NAMES, averaged over every evaluated query
    latency_ms: dict[str, dict[str, float]]  # stage -> {"p50": ..., "p95": ...}


@dataclass(frozen=True)
class EvalReport:
    dataset: str
    documents: int
    queries: int
    retriever: str
    reranker: str  # model id and kind, as the sidecar's Info reports them
    engine: str  # the reranker's engine, precision and device
    embedding_model: str
    candidates: int  # N, the depth reranked
    configurations: list[ConfigurationResult]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def reranker_description(info: rerank_pb2.InfoResponse) -> str:
    """What reranks, in a few words: the embedding model itself (cosine), or the model and its kind."""
    if info.model_kind != "bi-encoder":
        return f"{info.model_id}, {info.model_kind}"
    if info.HasField("embedding_model") and info.embedding_model.model_id == info.model_id:
        return f"{info.model_id}: reranking with the embedding model (cosine)"
    return f"{info.model_id}, bi-encoder (cosine)"


def engine_description(info: rerank_pb2.InfoResponse) -> str:
    """The serving engine in a few words, e.g. "torch bf16 on cpu, compiled"."""
    compiled = ", compiled" if info.compiled else ""
    return f"{info.engine} {info.precision} on {info.device}{compiled}"


def configuration_labels(candidates: int, info: rerank_pb2.InfoResponse) -> dict[str, str]:
    same_model = info.HasField("embedding_model") and info.embedding_model.model_id == info.model_id
    reranker = "the embedding model" if same_model else info.model_kind
    return {
        BM25: "BM25",
        DENSE: "dense",
        HYBRID: "hybrid RRF",
        RERANK: f"hybrid RRF + rerank top {candidates} ({reranker})",
    }


def quality(
    qrels: Mapping[str, Mapping[str, int]], rankings: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """NDCG@10, MRR@10 and Recall@100 with ir-measures, averaged over every query in ``rankings`` (a query
    that ranked nothing counts as 0)."""
    import ir_measures
    from ir_measures import RR, R, nDCG

    measures = dict(zip(MEASURE_NAMES, (nDCG @ 10, RR @ 10, R @ 100), strict=True))
    judged = [
        ir_measures.Qrel(query_id, doc_id, relevance)
        for query_id in rankings
        for doc_id, relevance in qrels[query_id].items()
    ]
    # Scores that fall with the rank: trec_eval reorders equal scores by document id, and our order stands.
    run = [
        ir_measures.ScoredDoc(query_id, doc_id, float(len(ranking) - position))
        for query_id, ranking in rankings.items()
        for position, doc_id in enumerate(ranking)
    ]
    totals = dict.fromkeys(measures.values(), 0.0)
    for metric in ir_measures.iter_calc(list(measures.values()), judged, run):
        totals[metric.measure] += metric.value
    return {name: totals[measure] / len(rankings) for name, measure in measures.items()}


def latency(runs: Sequence[QueryRun]) -> dict[str, dict[str, float]]:
    summary = {}
    for stage in STAGES:
        values = [run.timings_ms[stage] for run in runs if stage in run.timings_ms]
        if values:
            p50, p95 = np.percentile(values, [50, 95])
            summary[stage] = {"p50": float(p50), "p95": float(p95)}
    return summary


def summarize(
    qrels: Mapping[str, Mapping[str, int]],
    runs: Mapping[str, Mapping[str, QueryRun]],
    labels: Mapping[str, str],
) -> list[ConfigurationResult]:
    """``runs``: query id -> configuration -> its run."""
    results = []
    for key, label in labels.items():
        by_query = {query_id: configs[key] for query_id, configs in runs.items()}
        rankings = {query_id: run.ranking for query_id, run in by_query.items()}
        results.append(
            ConfigurationResult(key, label, quality(qrels, rankings), latency(list(by_query.values())))
        )
    return results


def report_table(report: EvalReport) -> Table:
    table = Table(
        title=f"{report.dataset}: {report.documents} documents, {report.queries} queries, {report.retriever}",
        caption=f"Latency in ms, p50 / p95, one query at a time. Embedding model: {report.embedding_model}; "
        f"reranker engine: {report.engine}. Rerank overlaps retrieval (candidates stream in pages).",
    )
    table.add_column("configuration")
    for column in ("NDCG@10", "MRR@10", "R@100", *STAGES):
        table.add_column(column, justify="right")
    for result in report.configurations:
        table.add_row(result.label, *_cells(result))
    return table


def _cells(result: ConfigurationResult) -> list[str]:
    cells = [f"{result.quality[name]:.3f}" for name in MEASURE_NAMES]
    for stage in STAGES:
        timing = result.latency_ms.get(stage)
        cells.append(f"{timing['p50']:.1f} / {timing['p95']:.1f}" if timing else "-")
    return cells


def write_plot(report: EvalReport, path: Path) -> None:
    """Two panels: the three measures per configuration, and the total latency (p50 bar, p95 whisker)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    results = report.configurations
    names = [result.key for result in results]
    positions = np.arange(len(results))
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(MEASURE_NAMES)
    for offset, measure in enumerate(MEASURE_NAMES):
        values = [result.quality[measure] for result in results]
        bars = left.bar(positions + (offset - 1) * width, values, width, label=measure)
        left.bar_label(bars, fmt="%.3f", fontsize=7)
    left.set(xticks=positions, xticklabels=names, ylim=(0, 1.12), title="Quality")
    left.legend(loc="upper center", ncols=len(MEASURE_NAMES), fontsize=8)
    p50 = np.array([result.latency_ms["total"]["p50"] for result in results])
    p95 = np.array([result.latency_ms["total"]["p95"] for result in results])
    bars = right.bar(positions, p50, yerr=[np.zeros_like(p50), p95 - p50], capsize=4)
    right.bar_label(bars, fmt="%.1f", fontsize=7, label_type="center")
    # Log scale: stage 1 takes milliseconds, reranking on a CPU up to seconds.
    right.set(xticks=positions, xticklabels=names, ylabel="ms", yscale="log")
    right.set_title("Total latency per query (bar p50, whisker p95)")
    figure.suptitle(f"{report.dataset}, {report.retriever}; rerank: {report.reranker}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
