from __future__ import annotations

import numpy as np
import pytest

from client.fusion import LegHit, Normalization, convex_fusion, normalized, reciprocal_rank_fusion


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


def test_convex_fusion_weighs_min_max_normalized_scores():
    legs = {
        "bm25": [LegHit("a", 10.0), LegHit("b", 6.0), LegHit("c", 2.0)],
        "vector": [LegHit("c", 0.9), LegHit("d", 0.7), LegHit("a", 0.5)],
    }
    fused = convex_fusion(legs, weights={"bm25": 0.3, "vector": 0.7})
    scores = {hit.id: hit.score for hit in fused}
    # bm25 -> a 1, b 0.5, c 0; vector -> c 1, d 0.5, a 0; a leg that missed a document gives it 0.
    assert scores == pytest.approx({"a": 0.3, "b": 0.15, "c": 0.7, "d": 0.35})
    assert [hit.id for hit in fused] == ["c", "d", "a", "b"]
    assert fused[0].leg_scores == {"bm25": 2.0, "vector": 0.9}


def test_convex_fusion_with_z_scores_gives_a_missing_document_the_legs_lowest():
    legs = {"bm25": [LegHit("a", 3.0), LegHit("b", 1.0), LegHit("c", 2.0)], "vector": [LegHit("b", 0.8)]}
    bm25 = {"bm25": legs["bm25"][:2]}
    scores = {hit.id: hit.score for hit in convex_fusion(bm25, weights={}, normalization="zscore")}
    assert scores == pytest.approx({"a": 1.0, "b": -1.0})  # z-scores: a +1, b -1
    scores = {hit.id: hit.score for hit in convex_fusion(legs, weights={}, normalization="zscore")}
    # The vector leg's one score has no spread: b's z-score is 0, and a and c, which it missed, get -1.
    assert scores == pytest.approx({"a": 1.5**0.5 - 1, "b": -(1.5**0.5), "c": -1.0})


@pytest.mark.parametrize("normalization", ["minmax", "zscore"])
@pytest.mark.parametrize("bm25", [[LegHit("a", 5.0)], [LegHit("a", 5.0), LegHit("c", 5.0)]])
def test_a_document_a_leg_missed_scores_below_its_hits_even_when_they_scored_the_same(
    bm25: list[LegHit], normalization: Normalization
):
    legs = {"bm25": bm25, "vector": [LegHit("b", 0.9), LegHit("a", 0.8), LegHit("c", 0.1)]}
    fused = convex_fusion(legs, weights={"bm25": 0.5, "vector": 0.5}, normalization=normalization)
    assert fused[0].id == "a"  # matched by both legs: b, missed by BM25, used to get BM25's full credit
    if normalization == "minmax":
        scores = {hit.id: hit.score for hit in fused}
        assert scores["b"] == pytest.approx(0.5)  # vector 1, BM25 0
        assert scores["a"] == pytest.approx(0.5 + 0.5 * 0.7 / 0.8)


def test_normalized_handles_equal_scores():
    assert normalized(np.array([2.0, 2.0])).tolist() == [1.0, 1.0]
    assert normalized(np.array([2.0, 2.0]), "zscore").tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="minmax or zscore"):
        normalized(np.array([1.0]), "rank")  # type: ignore[arg-type]


@pytest.mark.parametrize("normalization", ["minmax", "zscore"])
@pytest.mark.parametrize("broken", [float("nan"), float("inf"), float("-inf")])
def test_convex_fusion_drops_a_score_that_is_not_finite_instead_of_flattening_the_leg(
    broken: float, normalization: Normalization
):
    vector = [LegHit("c", 0.9), LegHit("d", 0.7), LegHit("a", 0.5)]
    legs = {
        "bm25": [LegHit("a", 10.0), LegHit("x", broken), LegHit("b", 6.0), LegHit("c", 2.0)],
        "vector": vector,
    }
    without = {"bm25": [hit for hit in legs["bm25"] if hit.id != "x"], "vector": vector}
    weights = {"bm25": 0.3, "vector": 0.7}

    fused = convex_fusion(legs, weights=weights, normalization=normalization)
    expected = convex_fusion(without, weights=weights, normalization=normalization)
    assert [(hit.id, hit.score) for hit in fused] == [(hit.id, hit.score) for hit in expected]
    assert all(np.isfinite(hit.score) for hit in fused)
