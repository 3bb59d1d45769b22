from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from sidecar.errors import ModelLoadError
from sidecar.model.batch import TokenBatch
from sidecar.model.cache import ArtifactCache
from sidecar.model.engines.openvino_engine import (
    RUNTIME_CACHE_CAPACITY,
    OpenVinoEngine,
    openvino_precisions,
    unavailable_reason,
)
from sidecar.model.parity import compare
from tests.conditions import needs_native_bf16
from tests.models import padded_batch


def openvino(exported, cache, precision: str = "fp32", workers: int = 1) -> OpenVinoEngine:
    return OpenVinoEngine(exported, cache, precision=precision, device="cpu", threads=1, workers=workers)


def test_fp32_matches_torch_to_1e_4(tiny_exported, artifact_cache, tiny_reference, tiny_probe):
    engine = OpenVinoEngine(
        tiny_exported, artifact_cache, precision="fp32", device="cpu", threads=1, workers=1
    )
    for batch in (*tiny_probe.batches, padded_batch(7, 300, seed=0), padded_batch(1, 5, seed=1)):
        np.testing.assert_allclose(engine.forward(batch), tiny_reference.forward(batch), atol=1e-4, rtol=0)


@needs_native_bf16
def test_bf16_passes_the_parity_gate(tiny_exported, artifact_cache, tiny_reference, tiny_probe):
    engine = OpenVinoEngine(
        tiny_exported, artifact_cache, precision="bf16", device="cpu", threads=1, workers=1
    )
    report = compare(tiny_probe.scores(engine), tiny_probe.scores(tiny_reference), "bf16")
    assert report.passed, report.describe()
    assert report.max_abs_diff > 0  # it really ran in bf16


@needs_native_bf16
def test_bf16_compiles_from_weights_stored_in_fp16(tmp_path: Path, tiny_exported):
    # The compiled model keeps its constants as stored: fp16 storage holds half of fp32's.
    openvino(tiny_exported, ArtifactCache(tmp_path), "bf16")
    (weights,) = tmp_path.rglob("openvino-fp16-weights-*/model.bin")
    onnx_bytes = sum(path.stat().st_size for path in tiny_exported.path.parent.iterdir())
    assert weights.stat().st_size < 0.6 * onnx_bytes


def test_batch_workers_each_get_a_request_of_their_own(tiny_exported, artifact_cache, tiny_reference):
    engine = OpenVinoEngine(
        tiny_exported, artifact_cache, precision="fp32", device="cpu", threads=1, workers=2
    )
    batches = [padded_batch(rows, 40 + seed, seed) for seed, rows in enumerate([8, 3, 5, 2] * 4)]
    with ThreadPoolExecutor(2) as workers:  # as the batcher's model threads call it
        outputs = list(workers.map(engine.forward, batches))
    for batch, output in zip(batches, outputs, strict=True):
        np.testing.assert_allclose(output, tiny_reference.forward(batch), atol=1e-4, rtol=0)


def test_after_giving_back_its_scratch_memory_it_scores_the_same(tiny_exported, artifact_cache):
    engine = openvino(tiny_exported, artifact_cache, workers=2)
    batches = [padded_batch(8, 300, seed=0), padded_batch(2, 20, seed=1)]
    with ThreadPoolExecutor(2) as workers:  # both streams hold scratch memory
        before = list(workers.map(engine.forward, batches))
    engine.release_scratch()
    engine.release_scratch()  # nothing left to give back is no error
    with ThreadPoolExecutor(2) as workers:
        after = list(workers.map(engine.forward, batches))
    for first, again in zip(before, after, strict=True):
        np.testing.assert_array_equal(first, again)


def test_more_batch_shapes_than_its_runtime_cache_holds_score_the_same(tmp_path: Path, tiny_exported):
    engine = openvino(tiny_exported, ArtifactCache(tmp_path))
    # Executors are kept for a bounded number of shapes, so ever new traffic shapes cannot grow it; the
    # compiled blob is keyed by that bound too.
    (manifest,) = tmp_path.rglob("manifest.json")
    assert json.loads(manifest.read_text())["key"]["CPU_RUNTIME_CACHE_CAPACITY"] == str(
        RUNTIME_CACHE_CAPACITY
    )
    batches = [
        padded_batch(1 + index % 4, 8 + index, seed=index) for index in range(RUNTIME_CACHE_CAPACITY + 8)
    ]
    first = [engine.forward(batch) for batch in batches]
    again = [engine.forward(batch) for batch in batches]  # the early shapes were evicted meanwhile
    for before, after in zip(first, again, strict=True):
        np.testing.assert_array_equal(before, after)


def test_its_compiled_blob_is_cached_with_a_manifest(tmp_path: Path, tiny_exported):
    openvino(tiny_exported, ArtifactCache(tmp_path))
    (blob,) = tmp_path.rglob("*.blob")
    assert (blob.parent / "manifest.json").is_file()


def test_it_runs_on_the_cpu_only():
    assert unavailable_reason("cuda:0") == "OpenVINO runs on the CPU here; the device is cuda:0"
    assert openvino_precisions("cuda:0") == ()


def test_precisions_it_does_not_run_are_refused(tiny_exported, artifact_cache):
    with pytest.raises(ModelLoadError, match="does not run fp16"):
        openvino(tiny_exported, artifact_cache, "fp16")


def whole_vocabulary(vocab_size: int, row_length: int = 512) -> list[TokenBatch]:
    """Every token id once, in rows of ``row_length``: a damaged embedding row cannot hide from it."""
    ids = np.arange(vocab_size, dtype=np.int64)
    rows = [ids[start : start + row_length] for start in range(0, vocab_size, row_length)]
    batches = []
    for start in range(0, len(rows), 16):
        chunk = rows[start : start + 16]
        input_ids = np.zeros((len(chunk), row_length), dtype=np.int64)
        mask = np.zeros_like(input_ids)
        for row, tokens in enumerate(chunk):
            input_ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        batches.append(TokenBatch(input_ids, mask, np.zeros_like(input_ids)))
    return batches


def random_bytes_in_the_middle(blob: Path) -> None:
    """4 KiB of random bytes in the middle of the blob, where the word embeddings lie."""
    with blob.open("r+b") as stream:
        stream.seek(blob.stat().st_size // 2)
        stream.write(np.random.default_rng(0).bytes(4096))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(random_bytes_in_the_middle, id="random-bytes"),
        pytest.param(lambda blob: blob.write_bytes(blob.read_bytes()[:4096]), id="truncated"),
        pytest.param(lambda blob: blob.write_bytes(b""), id="emptied"),
    ],
)
def test_a_damaged_cached_blob_is_logged_rebuilt_and_scores_match_torch(
    tmp_path: Path, tiny_network, tiny_exported, tiny_reference, caplog, damage
):
    cache = ArtifactCache(tmp_path)
    openvino(tiny_exported, cache)
    blobs = list(tmp_path.rglob("*.blob"))
    assert blobs, "the engine cached no compiled blob"
    for blob in blobs:
        damage(blob)
    with caplog.at_level(logging.WARNING, logger="sidecar.model.cache"):
        engine = openvino(tiny_exported, cache)
    assert any(str(blobs[0].parent) in record.getMessage() for record in caplog.records), caplog.text
    vocab_size = tiny_network.model.get_input_embeddings().num_embeddings
    for batch in whole_vocabulary(vocab_size):
        outputs = engine.forward(batch)
        assert np.isfinite(outputs).all()
        np.testing.assert_allclose(outputs, tiny_reference.forward(batch), atol=1e-4, rtol=0)


def test_a_valid_cached_blob_is_imported_not_compiled_again(
    tmp_path: Path, tiny_exported, tiny_reference, caplog
):
    cache = ArtifactCache(tmp_path)
    openvino(tiny_exported, cache)
    with caplog.at_level(logging.INFO, logger="sidecar.model.cache"):
        engine = openvino(tiny_exported, cache)
    assert "reusing cached openvino" in caplog.text
    batch = padded_batch(4, 30, seed=2)
    np.testing.assert_allclose(engine.forward(batch), tiny_reference.forward(batch), atol=1e-4, rtol=0)
