"""Shape buckets and the engine built for them: on a CPU, the stand-in for the CUDA-graph engine."""

from __future__ import annotations

import itertools
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch._dynamo.utils

from sidecar.model.batch import EncodedPair, ShapeBuckets, bucket_bounds, collate
from sidecar.model.engines.torch_buckets import BucketedTorchEngine
from tests.model.conftest import CROSS_ENCODER_INPUTS
from tests.models import padded_batch


def test_bounds_double_then_grow_by_at_most_a_quarter():
    assert bucket_bounds(2, 256) == (
        2,
        4,
        8,
        16,
        24,
        32,
        40,
        48,
        56,
        64,
        80,
        96,
        112,
        128,
        160,
        192,
        224,
        256,
    )
    bounds = bucket_bounds(8, 8192)
    assert bounds[-1] == 8192
    assert all(later / earlier <= 1.25 for earlier, later in itertools.pairwise(bounds) if earlier >= 32)
    assert bucket_bounds(8, 300)[-2:] == (256, 300)  # the largest is always a bound of its own


@pytest.mark.parametrize(
    ("pairs", "tokens", "length"), [(256, 32768, 512), (32, 4096, 512), (16, 8192, 8192), (4, 100, 40)]
)
def test_every_batch_the_batcher_can_form_fits_a_bucket(pairs: int, tokens: int, length: int):
    buckets = ShapeBuckets(pairs, tokens, length)
    shapes = set(buckets.shapes)
    for columns in range(1, length + 1):
        # The batcher's own rule: rows x longest within the budget, or one row of any length.
        most_rows = max(1, min(pairs, tokens // columns))
        for rows in {1, 2, most_rows // 2 or 1, most_rows}:
            fitted = buckets.fit(rows, columns)
            assert fitted in shapes
            assert fitted[0] >= rows
            assert fitted[1] >= columns
            assert fitted[0] >= 2  # compiled graphs specialize a size of 1
    with pytest.raises(ValueError, match="over the max length"):
        buckets.fit(1, length + 1)
    with pytest.raises(ValueError, match="larger than any bucket"):
        buckets.fit(pairs + 1, 1)


def test_a_100_pair_request_of_passages_pads_little():
    # The GPU defaults' common case: 100 candidates of about 230 tokens, one batch.
    assert ShapeBuckets(256, 32768, 512).fit(100, 230) == (112, 256)


def test_collate_pads_to_the_bucket_with_rows_that_attend_to_one_token():
    pairs = [EncodedPair([101, 7, 102], [0, 0, 0]), EncodedPair([101, 102], [0, 1])]
    batch = collate(pairs, pad_token_id=0, with_token_type_ids=True, shape=(4, 8))
    assert batch.shape == (4, 8)
    assert batch.attention_mask.tolist() == [[1, 1, 1] + [0] * 5, [1, 1] + [0] * 6] + [[1] + [0] * 7] * 2
    assert batch.input_ids[0, :3].tolist() == [101, 7, 102]
    assert batch.token_type_ids[1, :2].tolist() == [0, 1]
    assert batch.padded_to(4, 8, pad_token_id=0) is batch
    again = collate(pairs, pad_token_id=0, with_token_type_ids=True).padded_to(4, 8, pad_token_id=0)
    for name, array in batch.as_dict().items():
        np.testing.assert_array_equal(again.as_dict()[name], array)


@pytest.fixture(scope="module")
def bucketed_engine(tiny_network) -> BucketedTorchEngine:
    buckets = ShapeBuckets(max_batch_pairs=8, max_batch_tokens=256, max_length=64)
    return BucketedTorchEngine(
        tiny_network, precision="fp32", device="cpu", buckets=buckets, input_names=CROSS_ENCODER_INPUTS
    )


def test_one_compiled_graph_serves_every_bucket_with_the_model_s_scores(bucketed_engine, tiny_reference):
    compiled_frames = torch._dynamo.utils.counters["frames"]["ok"]
    shapes = [(8, 32), (3, 17), (1, 9), (5, 1), (1, 1), (2, 64), (7, 30), (1, 64)]
    for seed, (rows, columns) in enumerate(shapes):
        batch = padded_batch(rows, columns, seed, min_length=1)
        outputs = bucketed_engine.forward(batch)
        assert outputs.shape == (rows, 1)
        np.testing.assert_allclose(outputs, tiny_reference.forward(batch), atol=1e-4)
    # Every bucket ran while the engine was built, so no batch compiled anything more.
    assert torch._dynamo.utils.counters["frames"]["ok"] == compiled_frames


def test_a_batch_larger_than_any_bucket_runs_in_slices(bucketed_engine, tiny_reference):
    batch = padded_batch(20, 16, seed=3)  # the batcher forms at most 8 rows
    np.testing.assert_allclose(bucketed_engine.forward(batch), tiny_reference.forward(batch), atol=1e-4)


def test_the_bucketed_engine_pads_and_serves_batch_workers_side_by_side(bucketed_engine, tiny_reference):
    random.seed(0)
    shapes = [(random.randint(1, 8), random.randint(1, 32)) for _ in range(12)]
    batches = [padded_batch(rows, columns, seed, min_length=1) for seed, (rows, columns) in enumerate(shapes)]

    with ThreadPoolExecutor(2) as workers:
        outputs = list(workers.map(bucketed_engine.forward, batches))
    for batch, output in zip(batches, outputs, strict=True):
        np.testing.assert_allclose(output, tiny_reference.forward(batch), atol=1e-4)


@pytest.mark.gpu
def test_on_cuda_every_bucket_is_a_cuda_graph_that_passes_the_gate(tiny_network, tiny_reference, tiny_probe):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from sidecar.model.parity import compare

    precision = "fp16"  # fp32 is checked served, in tests/families/test_serving.py
    buckets = ShapeBuckets(max_batch_pairs=32, max_batch_tokens=2048, max_length=512)
    engine = BucketedTorchEngine(
        tiny_network, precision=precision, device="cuda", buckets=buckets, input_names=CROSS_ENCODER_INPUTS
    )
    assert all(bucket.graph is not None for bucket in engine._buckets.values())
    report = compare(tiny_probe.scores(engine), tiny_probe.scores(tiny_reference), precision)
    assert report.passed, report.describe()
    batches = [
        padded_batch(rows, columns, seed) for seed, (rows, columns) in enumerate([(3, 40), (32, 60)] * 4)
    ]
    with ThreadPoolExecutor(2) as workers:  # as the batcher's model threads call it
        outputs = list(workers.map(engine.forward, batches))
    for batch, output in zip(batches, outputs, strict=True):
        np.testing.assert_allclose(output, tiny_reference.forward(batch), atol=0.05)
