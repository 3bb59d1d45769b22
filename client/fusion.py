"""Reciprocal rank fusion, as pure functions over ranked lists of ids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_RANK_CONSTANT = 60


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
    scores: dict[str, float] = {}
    ranks: dict[str, dict[str, int]] = {}
    raw_scores: dict[str, dict[str, float]] = {}
    for leg, hits in legs.items():
        weight = weights.get(leg, 1.0)
        for rank, hit in enumerate(hits, start=1):
            if leg in ranks.get(hit.id, {}):
                continue  # a leg that repeats an id counts its best rank only
            scores[hit.id] = scores.get(hit.id, 0.0) + weight / (rank_constant + rank)
            ranks.setdefault(hit.id, {})[leg] = rank
            raw_scores.setdefault(hit.id, {})[leg] = hit.score
    order = sorted(scores, key=lambda doc_id: (-scores[doc_id], min(ranks[doc_id].values()), doc_id))
    if size is not None:
        order = order[:size]
    return [FusedHit(doc_id, scores[doc_id], ranks[doc_id], raw_scores[doc_id]) for doc_id in order]
