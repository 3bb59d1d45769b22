from __future__ import annotations

import numpy as np
import pytest

from sidecar.model.parity import PROBE_DOCUMENTS, PROBE_QUERIES, compare, spearman


def test_spearman_of_identical_reversed_and_tied_orders():
    values = np.array([0.1, 0.5, 0.3, 0.9])
    assert spearman(values, values) == pytest.approx(1.0)
    assert spearman(values, -values) == pytest.approx(-1.0)
    assert spearman(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
        0.9487, abs=1e-4
    )


def test_constant_scores_fail_every_gate():
    reference = np.linspace(0.1, 0.9, 20)
    report = compare(np.full(20, 0.5), reference, "int8")
    assert np.isnan(report.spearman)
    assert not report.passed


def test_fp32_noise_passes_and_a_reordered_top_fails_even_the_int8_gate():
    rng = np.random.default_rng(0)
    reference = rng.uniform(0.0, 1.0, size=len(PROBE_QUERIES) * len(PROBE_DOCUMENTS))
    assert compare(reference + rng.normal(0, 1e-6, reference.shape), reference, "fp32").passed
    # What plain dynamic int8 does to a ranking: errors of a few hundredths reshuffle close scores.
    noisy = reference + rng.normal(0, 0.08, reference.shape)
    report = compare(noisy, reference, "int8")
    assert not report.passed, report.describe()


def test_int8_must_keep_nine_of_the_top_ten_even_when_the_order_elsewhere_holds():
    reference = np.linspace(0.0, 1.0, 96)
    two_dropped = reference.copy()
    # The two best fall just below the old 12th; the rest keep their order.
    two_dropped[[-1, -2]] = reference[-12] - np.array([1e-3, 2e-3])
    report = compare(two_dropped, reference, "int8")
    assert report.top_kept == 8
    assert report.spearman > 0.995
    assert not report.passed
    assert "top 10 kept 8 (limit 9)" in report.describe()
    one_dropped = reference.copy()
    one_dropped[-1] = reference[-11] - 1e-3  # just below the old 11th
    kept = compare(one_dropped, reference, "int8")
    assert kept.top_kept == 9
    assert compare(reference, reference, "fp32").describe().endswith("top 10 kept 10")
