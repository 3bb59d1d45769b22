from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sidecar.errors import ModelLoadError
from sidecar.model.engines.openvino_engine import OpenVinoEngine, openvino_precisions, unavailable_reason
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


def test_batch_workers_each_get_a_request_of_their_own(tiny_exported, artifact_cache, tiny_reference):
    engine = OpenVinoEngine(
        tiny_exported, artifact_cache, precision="fp32", device="cpu", threads=1, workers=2
    )
    batches = [padded_batch(rows, 40 + seed, seed) for seed, rows in enumerate([8, 3, 5, 2] * 4)]
    with ThreadPoolExecutor(2) as workers:  # as the batcher's model threads call it
        outputs = list(workers.map(engine.forward, batches))
    for batch, output in zip(batches, outputs, strict=True):
        np.testing.assert_allclose(output, tiny_reference.forward(batch), atol=1e-4, rtol=0)


def test_its_compiled_blobs_are_cached(tiny_exported, artifact_cache):
    openvino(tiny_exported, artifact_cache)
    assert any((artifact_cache.root / "openvino").iterdir())


def test_it_runs_on_the_cpu_only():
    assert unavailable_reason("cuda:0") == "OpenVINO runs on the CPU here; the device is cuda:0"
    assert openvino_precisions("cuda:0") == ()


def test_precisions_it_does_not_run_are_refused(tiny_exported, artifact_cache):
    with pytest.raises(ModelLoadError, match="does not run fp16"):
        openvino(tiny_exported, artifact_cache, "fp16")
