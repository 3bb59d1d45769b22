from __future__ import annotations

import copy
import itertools
import threading

import numpy as np
import pytest
import torch

from sidecar.model.batch import TokenBatch
from sidecar.model.engines.base import Engine
from sidecar.model.engines.torch_engine import TorchEngine
from sidecar.model.network import Network
from sidecar.model.parity import (
    PROBE_DOCUMENTS,
    PROBE_QUERIES,
    SWEEP_ROW_TOKENS,
    SWEEP_TOKENS,
    compare,
    cross_encoder_probe,
    spearman,
    vocabulary_sweep,
)
from sidecar.model.tokenization import PairSpec


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


def test_the_vocabulary_sweep_spreads_over_the_whole_table():
    rows = vocabulary_sweep(250_002, pad_token_id=1, max_length=512)
    ids = np.concatenate([row.input_ids for row in rows])
    assert len(ids) <= SWEEP_TOKENS
    assert ids.min() == 0
    assert ids.max() == 250_001
    assert 1 not in ids  # the padding id
    assert np.diff(ids).max() <= 250_002 // SWEEP_TOKENS + 2  # no stretch of the table is skipped
    assert all(len(row) <= SWEEP_ROW_TOKENS for row in rows)


def test_a_small_vocabulary_is_swept_whole_within_the_model_length():
    rows = vocabulary_sweep(1000, pad_token_id=0, max_length=64)
    assert np.concatenate([row.input_ids for row in rows]).tolist() == list(range(1, 1000))
    assert max(len(row) for row in rows) == 64


def damaged_embeddings(network: Network, token_ids: list[int], values: np.ndarray) -> TorchEngine:
    """A torch engine whose copy of the network has ``values`` in the embedding rows of ``token_ids``."""
    damaged = copy.deepcopy(network)
    with torch.no_grad():
        damaged.model.get_input_embeddings().weight[token_ids] = torch.as_tensor(values, dtype=torch.float32)
    return TorchEngine(damaged, precision="fp32", device="cpu")


@pytest.mark.parametrize("damage", ["nan", "garbage"])
def test_a_damaged_embedding_row_that_no_probe_text_reads_fails_the_gate(
    tiny_model, tiny_network, tiny_probe, tiny_reference, damage
):
    texts = len(PROBE_QUERIES) * len(PROBE_DOCUMENTS)
    spec = PairSpec(max_length=tiny_model.max_length)
    text_tokens = {
        token
        for query in PROBE_QUERIES
        for pair in tiny_model.tokenizer.encode(query, PROBE_DOCUMENTS, spec).pairs
        for token in pair.input_ids
    }
    sweep = vocabulary_sweep(30522, pad_token_id=0, max_length=512)
    swept = [token for row in sweep for token in row.input_ids]
    unread = [token for token in swept if token not in text_tokens][100:104]
    assert len(unread) == 4
    width = tiny_network.model.get_input_embeddings().weight.shape[1]
    values = (
        np.full((4, width), np.nan)
        if damage == "nan"
        else np.random.default_rng(0).normal(0, 50, (4, width))  # random bytes read as weights
    )
    engine = damaged_embeddings(tiny_network, unread, values)
    scores, reference = tiny_probe.scores(engine), tiny_probe.scores(tiny_reference)
    # The probe texts alone would have passed it: none of them reads the damaged rows.
    assert compare(scores[:texts], reference[:texts], "fp32").passed
    report = compare(scores, reference, "fp32")
    assert not report.passed, report.describe()
    if damage == "nan":
        assert "not finite" in report.describe()


def test_an_infinite_output_fails_the_gate_although_its_sigmoid_is_finite(tiny_probe, tiny_reference):
    class InfiniteFirstRow(Engine):
        name = "infinite"

        def forward(self, batch: TokenBatch) -> np.ndarray:
            outputs = tiny_reference.forward(batch)
            outputs[0] = np.inf
            return outputs

    report = compare(
        tiny_probe.scores(InfiniteFirstRow(precision="fp32", device="cpu")),
        tiny_probe.scores(tiny_reference),
        "fp32",
    )
    assert not report.passed
    assert report.describe().startswith(f"{len(tiny_probe.batches)} of ")


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


def test_the_probe_keeps_to_the_batch_token_budget_and_scores_the_same_rows(tiny_model, tiny_reference):
    unbounded = cross_encoder_probe(tiny_model, 32, vocab_size=30522)
    bounded = cross_encoder_probe(tiny_model, 32, vocab_size=30522, max_batch_tokens=1024)
    assert any(batch.input_ids.size > 1024 for batch in unbounded.batches)
    assert all(batch.input_ids.size <= 1024 for batch in bounded.batches)
    assert sum(len(batch.input_ids) for batch in bounded.batches) == len(unbounded.order)
    np.testing.assert_allclose(bounded.scores(tiny_reference), unbounded.scores(tiny_reference), atol=1e-5)


def test_probe_batches_run_side_by_side_after_one_row_alone(tiny_probe, tiny_reference):
    together = threading.Barrier(2, timeout=30)
    first_done = threading.Event()

    class TwoWorkers(Engine):
        """The reference; its first forward, of one row, must end before any other starts (a first call
        into an engine's bindings initializes what two threads at once can deadlock on), and the next two
        each wait for the other: they must run at once."""

        name = "two-workers"
        calls = itertools.count(1)

        def forward(self, batch: TokenBatch) -> np.ndarray:
            call = next(self.calls)
            assert (call, batch.shape[0]) == (1, 1) or first_done.is_set()
            if call in (2, 3):
                together.wait()
            scores = tiny_reference.forward(batch)
            first_done.set()
            return scores

    assert len(tiny_probe.batches) >= 2
    side_by_side = tiny_probe.scores(TwoWorkers(precision="fp32", device="cpu"), side_by_side=2)
    np.testing.assert_array_equal(side_by_side, tiny_probe.scores(tiny_reference))
