from __future__ import annotations

import pytest

from client.fusion import LegHit, reciprocal_rank_fusion


def hits(*ids: str) -> list[LegHit]:
    return [LegHit(doc_id, float(len(ids) - rank)) for rank, doc_id in enumerate(ids)]


def test_each_leg_adds_weight_over_rank_constant_plus_rank():
    fused = reciprocal_rank_fusion(
        {"bm25": hits("a", "b", "c"), "vector": hits("c", "d")}, rank_constant=10, weights={"vector": 2.0}
    )
    scores = {hit.id: hit.score for hit in fused}
    assert scores == pytest.approx({"a": 1 / 11, "b": 1 / 12, "c": 1 / 13 + 2 / 11, "d": 2 / 12})
    assert [hit.id for hit in fused] == ["c", "d", "a", "b"]
    assert fused[0].leg_ranks == {"bm25": 3, "vector": 1}
    assert fused[0].leg_scores == {"bm25": 1.0, "vector": 2.0}


def test_ties_break_by_best_rank_then_id_and_size_cuts():
    fused = reciprocal_rank_fusion({"bm25": hits("x", "b"), "vector": hits("a", "y")}, size=3)
    assert [hit.id for hit in fused] == ["a", "x", "b"]  # a and x tie at rank 1; b and y tie at rank 2


def test_a_repeated_id_counts_its_best_rank_once():
    fused = reciprocal_rank_fusion({"bm25": hits("a", "a", "b")})
    assert [(hit.id, hit.leg_ranks["bm25"]) for hit in fused] == [("a", 1), ("b", 3)]


@pytest.mark.parametrize(("rank_constant", "weights"), [(0, None), (60, {"bm25": -1.0})])
def test_rejects_invalid_parameters(rank_constant: int, weights: dict[str, float] | None):
    with pytest.raises(ValueError, match=r"rank_constant|weights"):
        reciprocal_rank_fusion({"bm25": hits("a")}, rank_constant=rank_constant, weights=weights)
