"""The report of ``rerank-client eval``: quality from ir-measures (pytrec_eval underneath, imported only when
an evaluation runs, as is matplotlib for the chart), latency percentiles, the table, the JSON and the plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table
from rich.text import Text

from client.evaluation.runner import BLEND, BM25, DENSE, HYBRID, RERANK, QueryRun
from client.pipeline import PipelineOptions
from rerank.v1 import rerank_pb2

MEASURE_NAMES = ("ndcg@10", "mrr@10", "recall@100")
STAGES = ("embed", "retrieval", "rerank", "total")


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
    embedding_model: str  # with the engine and precision that embedded the corpus
    candidates: int  # N, the depth reranked
    configurations: list[ConfigurationResult]
    split: str = "test"
    fusion: str = "RRF, k 60"  # the hybrid configurations' stage-1 fusion
    concurrency: int = 1  # queries in flight while latencies were measured
    warnings: list[str] = field(default_factory=list)
    sweep: list[dict[str, Any]] = field(default_factory=list)  # settings and quality per grid point

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


def configuration_labels(
    candidates: int, info: rerank_pb2.InfoResponse, fusion: str, rerank_blend: float
) -> dict[str, str]:
    same_model = info.HasField("embedding_model") and info.embedding_model.model_id == info.model_id
    reranker = "the embedding model" if same_model else info.model_kind
    return {
        BM25: "BM25",
        DENSE: "dense",
        HYBRID: f"hybrid {fusion}",
        RERANK: f"hybrid {fusion} + rerank top {candidates} ({reranker})",
        BLEND: f"hybrid {fusion} + rerank top {candidates} ({reranker}), {rerank_blend:g} x rerank + "
        f"{1 - rerank_blend:g} x stage 1",
    }


def fusion_description(options: PipelineOptions) -> str:
    """The client's hybrid fusion in a few words, e.g. "RRF, k 60" or "convex minmax, vector 0.6"."""
    if options.fusion == "elasticsearch":
        return f"RRF in Elasticsearch, k {options.rank_constant}"
    if options.fusion_method == "convex":
        return f"convex {options.normalization}, vector {options.convex_weight:g}"
    weights = (options.bm25_weight, options.vector_weight)
    weighted = f", weights {weights[0]:g}/{weights[1]:g}" if weights != (1.0, 1.0) else ""
    return f"RRF, k {options.rank_constant}{weighted}"


def lossy_embedder_warning(embedding: rerank_pb2.EmbeddingModelInfo) -> str | None:
    """A warning when the corpus was embedded at a lossy precision (int8 anywhere; bf16 or fp16 on a CPU),
    whose dense quality is below the model's own."""
    lossy = embedding.precision == "int8" or (
        embedding.precision in ("bf16", "fp16") and embedding.device.startswith("cpu")
    )
    if not lossy:
        return None
    return (
        f"the embedder serves {embedding.model_id} in {embedding.precision} on {embedding.device}, a lossy "
        "precision: dense and hybrid figures are below the model's own; start the sidecar with --precision "
        "fp32 to measure the model"
    )


def quality(
    qrels: Mapping[str, Mapping[str, int]], rankings: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """NDCG@10, MRR@10 and Recall@100 with ir-measures, averaged over every query in ``rankings`` (a query
    that ranked nothing counts as 0; a document ranked twice counts once, at its first rank)."""
    import ir_measures
    from ir_measures import RR, R, nDCG

    measures = dict(zip(MEASURE_NAMES, (nDCG @ 10, RR @ 10, R @ 100), strict=True))
    judged = [
        ir_measures.Qrel(query_id, doc_id, relevance)
        for query_id in rankings
        for doc_id, relevance in qrels[query_id].items()
    ]
    # Scores that fall with the rank: trec_eval reorders equal scores by document id, and our order stands.
    # A document listed twice counts at its first rank (ir-measures would keep the last one's score).
    run = [
        ir_measures.ScoredDoc(query_id, doc_id, -float(position))
        for query_id, ranking in rankings.items()
        for position, doc_id in enumerate(dict.fromkeys(ranking))
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
    load = (
        "one query at a time"
        if report.concurrency == 1
        else f"measured under concurrency, {report.concurrency} queries in flight"
    )
    # Text, not str: a dataset's or model's name is not rich markup.
    table = Table(
        title=Text(
            f"{report.dataset} ({report.split}): {report.documents} documents, {report.queries} queries, "
            f"{report.retriever}",
            style="table.title",
        ),
        caption=Text(
            f"Latency in ms, p50 / p95, {load}. Embedding model: {report.embedding_model}; "
            f"reranker engine: {report.engine}. Rerank overlaps retrieval (candidates stream in pages).",
            style="table.caption",
        ),
    )
    table.add_column("configuration")
    for column in ("NDCG@10", "MRR@10", "R@100", *STAGES):
        table.add_column(column, justify="right")
    for result in report.configurations:
        table.add_row(Text(result.label), *_cells(result))
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
    load = "" if report.concurrency == 1 else f", {report.concurrency} queries in flight"
    right.set_title(f"Total latency per query (bar p50, whisker p95{load})")
    figure.suptitle(f"{report.dataset}, {report.retriever}; rerank: {report.reranker}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
