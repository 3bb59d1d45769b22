from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch._dynamo.utils

from sidecar.errors import ModelLoadError
from sidecar.model.engines.torch_engine import TorchEngine, compile_wanted, torch_batch_variance
from sidecar.model.parity import compare
from tests.conditions import needs_native_bf16
from tests.models import padded_batch


@needs_native_bf16
def test_bf16_passes_the_parity_gate_and_leaves_the_reference_fp32(tiny_network, tiny_reference, tiny_probe):
    engine = TorchEngine(tiny_network, precision="bf16", device="cpu")
    report = compare(tiny_probe.scores(engine), tiny_probe.scores(tiny_reference), "bf16")
    assert report.passed, report.describe()
    assert report.max_abs_diff > 0  # it really ran in bf16
    assert next(tiny_network.parameters()).dtype.is_floating_point
    assert str(next(tiny_network.parameters()).dtype) == "torch.float32"


def test_torch_below_fp32_says_it_is_not_batch_invariant():
    assert torch_batch_variance("fp32") == ""
    assert "batch" in torch_batch_variance("bf16")
    assert "batch" in torch_batch_variance("fp16")


@needs_native_bf16
def test_the_bf16_engine_says_it_is_not_batch_invariant_and_fp32_that_it_is(tiny_network):
    assert TorchEngine(tiny_network, precision="fp32").batch_variance == ""
    assert TorchEngine(tiny_network, precision="bf16").batch_variance == torch_batch_variance("bf16")


def test_fp16_is_refused_on_the_cpu(tiny_network):
    with pytest.raises(ModelLoadError, match="does not run fp16 on cpu"):
        TorchEngine(tiny_network, precision="fp16", device="cpu")


def test_compile_auto_compiles_wherever_torch_serves():
    assert compile_wanted("auto", "cpu")
    assert compile_wanted("auto", "cuda:0")  # before serving there (see test_selection)
    assert compile_wanted("on", "cuda:0")
    assert not compile_wanted("off", "cpu")
    with pytest.raises(ModelLoadError, match="unknown --torch-compile 'yes'"):
        compile_wanted("yes", "cpu")


def test_one_compiled_graph_serves_every_batch_shape_with_the_model_s_scores(tiny_network, tiny_reference):
    engine = TorchEngine(tiny_network, precision="fp32", device="cpu", compile_sample=padded_batch(8, 64, 0))
    compiled_frames = torch._dynamo.utils.counters["frames"]["ok"]
    # A single row or column would specialize a second graph if the engine did not pad it.
    for seed, (rows, columns) in enumerate([(8, 64), (3, 17), (1, 9), (5, 1), (1, 1), (16, 128), (2, 2)]):
        batch = padded_batch(rows, columns, seed, min_length=1)
        outputs = engine.forward(batch)
        assert outputs.shape == (rows, 1)
        np.testing.assert_allclose(outputs, tiny_reference.forward(batch), atol=1e-4)
    assert torch._dynamo.utils.counters["frames"]["ok"] == compiled_frames


def test_a_compiled_engine_serves_batch_workers_side_by_side(tiny_network, tiny_reference):
    engine = TorchEngine(tiny_network, precision="fp32", device="cpu", compile_sample=padded_batch(8, 64, 0))
    shapes = [(8, 64), (3, 17), (5, 40), (2, 9)] * 4
    batches = [padded_batch(rows, columns, seed) for seed, (rows, columns) in enumerate(shapes)]
    with ThreadPoolExecutor(2) as workers:  # as the batcher's model threads call it
        outputs = list(workers.map(engine.forward, batches))
    for batch, output in zip(batches, outputs, strict=True):
        np.testing.assert_allclose(output, tiny_reference.forward(batch), atol=1e-4)


@needs_native_bf16
def test_the_compiled_engine_freezes_weights_into_packed_linear_kernels(tiny_network):
    # Without freezing, Inductor leaves each linear layer as addmm plus a bias copy (about 25% slower
    # on the real model); torch.compile's own `options` do not turn freezing on.
    batch = padded_batch(4, 16, seed=0)
    engine = TorchEngine(tiny_network, precision="bf16", device="cpu", compile_sample=batch)
    with torch.profiler.profile() as profile:
        engine.forward(batch)
    operators = {event.key for event in profile.key_averages()}
    assert "mkldnn::_linear_pointwise" in operators, sorted(operators)
    assert "aten::addmm" not in operators
