"""Fusion of ranked legs, as pure functions: reciprocal rank fusion, and convex combination of normalized
scores (Bruch, Gai and Ingber, "An Analysis of Fusion Functions for Hybrid Retrieval", 2023)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

DEFAULT_RANK_CONSTANT = 60
Normalization = Literal["minmax", "zscore"]


@dataclass(frozen=True)
class LegHit:
    """One hit of one retrieval leg (BM25 or vector), in the leg's order."""

    id: str
    score: float


@dataclass(frozen=True)
class FusedHit:
    id: str
    score: float
    # 1-based rank and raw score in each leg that returned the document.
    leg_ranks: Mapping[str, int] = field(default_factory=dict)
    leg_scores: Mapping[str, float] = field(default_factory=dict)


def reciprocal_rank_fusion(
    legs: Mapping[str, Sequence[LegHit]],
    *,
    rank_constant: int = DEFAULT_RANK_CONSTANT,
    weights: Mapping[str, float] | None = None,
    size: int | None = None,
) -> list[FusedHit]:
    """Fuse ranked legs: each leg adds ``weight / (rank_constant + rank)`` for every document it returned.

    Ties break by the best rank in any leg, then by id, so the order is deterministic.
    """
    if rank_constant < 1:
        raise ValueError(f"rank_constant must be at least 1, got {rank_constant}")
    weights = weights or {}
    if any(weight < 0 for weight in weights.values()):
        raise ValueError(f"leg weights must be zero or more, got {dict(weights)}")
    ranks, raw_scores = _leg_ranks(legs)
    scores = {
        doc_id: sum(weights.get(leg, 1.0) / (rank_constant + rank) for leg, rank in doc_ranks.items())
        for doc_id, doc_ranks in ranks.items()
    }
    return _ordered(scores, ranks, raw_scores, size)


def convex_fusion(
    legs: Mapping[str, Sequence[LegHit]],
    *,
    weights: Mapping[str, float],
    normalization: Normalization = "minmax",
    size: int | None = None,
) -> list[FusedHit]:
    """Fuse legs by their scores: each leg's scores are normalized over the hits it returned (min-max to
    [0, 1], or z-scores), and a document scores the weighted sum. A leg that did not return a document gives
    it that leg's lowest normalized score, as if it ranked last, or one less where the leg's hits all scored
    the same (one hit, say): a document the leg missed never scores as high as the leg's best hit. Ties break
    as in RRF. A hit whose score is not finite counts as not returned: one NaN would make the leg's spread NaN
    and give every hit of the leg the same score."""
    if any(weight < 0 for weight in weights.values()):
        raise ValueError(f"leg weights must be zero or more, got {dict(weights)}")
    legs = {leg: [hit for hit in hits if math.isfinite(hit.score)] for leg, hits in legs.items()}
    ranks, raw_scores = _leg_ranks(legs)
    scores = dict.fromkeys(ranks, 0.0)
    for leg in legs:
        returned = {doc_id: leg_scores[leg] for doc_id, leg_scores in raw_scores.items() if leg in leg_scores}
        if not returned:
            continue
        values = normalized(np.fromiter(returned.values(), dtype=np.float64), normalization)
        by_id = dict(zip(returned, values.tolist(), strict=True))
        lowest = float(values.min())
        # Equal scores all normalize to the leg's best (min-max: 1), which a missed document must not share.
        floor = lowest if float(values.max()) > lowest else lowest - 1.0
        for doc_id in scores:
            scores[doc_id] += weights.get(leg, 1.0) * by_id.get(doc_id, floor)
    return _ordered(scores, ranks, raw_scores, size)


def normalized(scores: np.ndarray, normalization: Normalization = "minmax") -> np.ndarray:
    """Min-max to [0, 1] (all 1 when the scores are equal), or z-scores (all 0 when they are equal)."""
    if normalization == "minmax":
        spread = float(scores.max() - scores.min()) if scores.size else 0.0
        return (scores - scores.min()) / spread if spread > 0 else np.ones_like(scores)
    if normalization == "zscore":
        deviation = float(scores.std()) if scores.size else 0.0
        return (scores - scores.mean()) / deviation if deviation > 0 else np.zeros_like(scores)
    raise ValueError(f"normalization must be minmax or zscore, got {normalization!r}")


def _leg_ranks(
    legs: Mapping[str, Sequence[LegHit]],
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, float]]]:
    """Each document's 1-based rank and raw score in every leg that returned it (a repeated id: its best)."""
    ranks: dict[str, dict[str, int]] = {}
    raw_scores: dict[str, dict[str, float]] = {}
    for leg, hits in legs.items():
        for rank, hit in enumerate(hits, start=1):
            if leg in ranks.get(hit.id, {}):
                continue
            ranks.setdefault(hit.id, {})[leg] = rank
            raw_scores.setdefault(hit.id, {})[leg] = hit.score
    return ranks, raw_scores


def _ordered(
    scores: Mapping[str, float],
    ranks: Mapping[str, Mapping[str, int]],
    raw_scores: Mapping[str, Mapping[str, float]],
    size: int | None,
) -> list[FusedHit]:
    order = sorted(scores, key=lambda doc_id: (-scores[doc_id], min(ranks[doc_id].values()), doc_id))
    if size is not None:
        order = order[:size]
    return [FusedHit(doc_id, scores[doc_id], ranks[doc_id], raw_scores[doc_id]) for doc_id in order]
