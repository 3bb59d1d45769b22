"""``rerank-client eval --sweep``: hybrid stage-1 quality over a grid of fusion settings.

Each query's legs are searched once; every grid point fuses the same hits, so the sweep costs one search per
leg and query however large the grid. Settings are to be chosen on a training split and reported on test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from rich.table import Table
from rich.text import Text

from client.evaluation.report import quality
from client.fusion import LegHit
from client.pipeline import PipelineOptions
from client.retrieval.base import Retriever, SearchRequest
from client.sidecar_client import AsyncRerankClient

RANK_CONSTANTS = (10, 20, 40, 60, 100)
RRF_WEIGHTS = ((1.0, 1.0), (1.0, 1.5), (1.0, 2.0), (1.5, 1.0), (2.0, 1.0))  # BM25, vector
CONVEX_WEIGHTS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # of the vector leg
NORMALIZATIONS = ("minmax", "zscore")


def grid() -> list[dict[str, Any]]:
    """The fusion settings swept, each as the ``SearchRequest`` fields it sets."""
    points: list[dict[str, Any]] = [
        {"fusion_method": "rrf", "rank_constant": k, "bm25_weight": bm25, "vector_weight": vector}
        for k in RANK_CONSTANTS
        for bm25, vector in RRF_WEIGHTS
    ]
    points += [
        {"fusion_method": "convex", "convex_weight": weight, "normalization": normalization}
        for normalization in NORMALIZATIONS
        for weight in CONVEX_WEIGHTS
    ]
    return points


@dataclass(frozen=True)
class SweepPoint:
    settings: dict[str, Any]  # SearchRequest fields
    quality: dict[str, float]

    @property
    def flags(self) -> str:
        """The settings as ``rerank-client`` flags."""
        return " ".join(f"--{name.replace('_', '-')} {value}" for name, value in self.settings.items())


async def collect_legs(
    retriever: Retriever,
    sidecar: AsyncRerankClient,
    options: PipelineOptions,
    queries: Mapping[str, str],
    depth: int,
    *,
    concurrency: int = 1,
    on_query: Callable[[], None] = lambda: None,
) -> dict[str, tuple[SearchRequest, dict[str, list[LegHit]]]]:
    """Query id -> its hybrid request (``depth`` deep, fused in the client, which every grid point needs)
    and the hits of both legs."""
    options = replace(options, fusion="client")
    slots = asyncio.Semaphore(concurrency)

    async def search(query: str) -> tuple[SearchRequest, dict[str, list[LegHit]]]:
        async with slots:
            embeddings = await sidecar.embed([query], timeout=options.embed_timeout)
            request = options.search_request(query, "hybrid", query_vector=embeddings.vectors[0], size=depth)
            legs = await asyncio.to_thread(retriever.leg_hits, request)
        on_query()
        return request, legs

    found = await asyncio.gather(*(search(query) for query in queries.values()))
    return dict(zip(queries, found, strict=True))


def sweep(
    qrels: Mapping[str, Mapping[str, int]],
    legs: Mapping[str, tuple[SearchRequest, Mapping[str, Sequence[LegHit]]]],
    points: Sequence[dict[str, Any]] | None = None,
) -> list[SweepPoint]:
    """Every grid point's quality over the queries in ``legs``, best NDCG@10 first."""
    results = []
    for settings in grid() if points is None else points:
        rankings = {
            query_id: [hit.id for hit in replace(request, **settings).fuse(hits)]
            for query_id, (request, hits) in legs.items()
        }
        results.append(SweepPoint(settings, quality(qrels, rankings)))
    return sorted(results, key=lambda point: -point.quality["ndcg@10"])


def sweep_table(points: Sequence[SweepPoint], split: str) -> Table:
    table = Table(
        title=Text(  # not markup
            f"Hybrid stage 1 over fusion settings, on the {split} split (best first)", style="table.title"
        ),
        caption="Choose on a training split; report the chosen settings on test.",
    )
    for column in ("settings", "NDCG@10", "R@100"):
        table.add_column(column, justify="left" if column == "settings" else "right")
    for point in points:
        table.add_row(point.flags, f"{point.quality['ndcg@10']:.4f}", f"{point.quality['recall@100']:.4f}")
    return table
