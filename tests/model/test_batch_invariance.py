"""A pair's score must not depend on what shares its batch, nor on the order pairs arrive in: another
caller's traffic must never move it. Checked for every engine and precision this machine runs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from sidecar.model.batch import collate
from sidecar.model.engines.base import Engine
from sidecar.model.engines.onnxruntime_engine import OnnxRuntimeEngine
from sidecar.model.engines.openvino_engine import OpenVinoEngine
from sidecar.model.engines.openvino_int8 import StaticInt8
from sidecar.model.engines.torch_engine import TorchEngine
from sidecar.model.tokenization import PairSpec
from tests.conditions import needs_int8_dot_products, needs_native_bf16, needs_openvino_int8

QUERY = "what do cats eat"
TARGET = "Cats are obligate carnivores: they eat meat, and kittens drink their mother's milk."
COMPANIONS = [
    f"Companion document {index} on markets, rates and growth. " * (1 + index % 7) for index in range(30)
]
# Normalized scores. fp32 is the same arithmetic in another order; ONNX Runtime's int8 has int8 weights
# but fp32 activations, and OpenVINO's static int8 activation scales fixed by calibration, so neither
# scale depends on the batch; OpenVINO's bf16 measured exactly invariant.
# torch's bf16 rounds every GEMM output and oneDNN picks its kernels by the batch's shape: a pair
# padded to another length moves by up to 3e-3 with real MiniLM weights (benchmarks/RESULTS.md,
# "Batch invariance"), under its parity tolerance of 0.02 but not at 1e-3.
EXACT, ROUNDED, TORCH_BF16 = 1e-5, 1e-3, 5e-3


def torch_engine(precision: str, compiled: bool = False) -> Callable[..., Engine]:
    def build(network, exported, cache, probe, sample, calibration) -> Engine:
        return TorchEngine(network, precision=precision, compile_sample=sample if compiled else None)

    return build


def openvino_engine(precision: str) -> Callable[..., Engine]:
    def build(network, exported, cache, probe, sample, calibration) -> Engine:
        return OpenVinoEngine(exported, cache, precision=precision, device="cpu", threads=1, workers=1)

    return build


def openvino_int8_engine(*, feed_forward_in_fp32: bool) -> Callable[..., Engine]:
    def build(network, exported, cache, probe, sample, calibration) -> Engine:
        models = StaticInt8(exported, calibration, cache)
        model = (
            models.feed_forward_in_fp32("asked by the test") if feed_forward_in_fp32 else models.all_in_int8()
        )
        return OpenVinoEngine(
            exported, cache, precision="int8", device="cpu", threads=1, workers=1, model=model
        )

    return build


def onnxruntime_engine(precision: str) -> Callable[..., Engine]:
    def build(network, exported, cache, probe, sample, calibration) -> Engine:
        return OnnxRuntimeEngine(exported, cache, precision=precision, device="cpu", threads=1)

    return build


@pytest.mark.parametrize(
    ("tolerance", "factory"),
    [
        pytest.param(EXACT, torch_engine("fp32"), id="torch/fp32"),
        pytest.param(EXACT, torch_engine("fp32", compiled=True), id="torch/fp32-compiled"),
        pytest.param(TORCH_BF16, torch_engine("bf16"), id="torch/bf16", marks=needs_native_bf16),
        pytest.param(EXACT, onnxruntime_engine("fp32"), id="onnxruntime/fp32"),
        pytest.param(EXACT, openvino_engine("fp32"), id="openvino/fp32"),
        pytest.param(ROUNDED, openvino_engine("bf16"), id="openvino/bf16", marks=needs_native_bf16),
        pytest.param(
            ROUNDED, onnxruntime_engine("int8"), id="onnxruntime/int8", marks=needs_int8_dot_products
        ),
        pytest.param(
            ROUNDED,
            openvino_int8_engine(feed_forward_in_fp32=False),
            id="openvino/int8",
            marks=needs_openvino_int8,
        ),
        pytest.param(
            ROUNDED,
            openvino_int8_engine(feed_forward_in_fp32=True),
            id="openvino/int8-feed-forward-in-fp32",
            marks=needs_openvino_int8,
        ),
    ],
)
def test_a_pair_scores_the_same_whatever_shares_its_batch(
    tolerance, factory, tiny_model, tiny_network, tiny_exported, artifact_cache, tiny_probe, tiny_calibration
):
    spec = PairSpec(max_length=128)
    target = tiny_model.tokenizer.encode(QUERY, [TARGET], spec).pairs[0]
    companions = tiny_model.tokenizer.encode(QUERY, COMPANIONS, spec).pairs
    pad, types = tiny_model.pad_token_id, tiny_model.uses_token_type_ids
    batches = {
        "alone": ([target], 0),
        "first of 31": ([target, *companions], 0),
        "last of 31, reversed": ([*reversed(companions), target], 30),
        "among 3 short ones": ([companions[0], target, companions[7]], 1),
    }
    sample = collate(companions[:8], pad, types)
    engine = factory(tiny_network, tiny_exported, artifact_cache, tiny_probe, sample, tiny_calibration)
    scores = {
        label: 1.0 / (1.0 + np.exp(-float(engine.forward(collate(rows, pad, types))[index, 0])))
        for label, (rows, index) in batches.items()
    }
    spread = max(scores.values()) - min(scores.values())
    assert spread <= tolerance, scores
