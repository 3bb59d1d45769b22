from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest

from sidecar.errors import ModelLoadError
from sidecar.model.cache import ArtifactCache
from sidecar.model.engines import onnxruntime_fusion
from sidecar.model.engines.onnxruntime_engine import OnnxRuntimeEngine, optimized_model
from sidecar.model.engines.onnxruntime_fusion import fuse_export, fuse_in_subprocess
from sidecar.model.engines.torch_engine import TorchEngine
from sidecar.model.export import export_onnx
from sidecar.model.kinds import load_network
from sidecar.model.loading import ModelKind, ModelSource, load_cross_encoder
from sidecar.model.network import content_hash
from sidecar.model.parity import TOLERANCES, compare, cross_encoder_probe
from tests.conditions import needs_int8_dot_products
from tests.models import padded_batch, save_tiny_roberta


def test_fp32_matches_torch_to_1e_4(tiny_exported, artifact_cache, tiny_reference, tiny_probe):
    engine = OnnxRuntimeEngine(tiny_exported, artifact_cache, precision="fp32", device="cpu", threads=1)
    for batch in (*tiny_probe.batches, padded_batch(7, 300, seed=0), padded_batch(1, 5, seed=1)):
        np.testing.assert_allclose(engine.forward(batch), tiny_reference.forward(batch), atol=1e-4, rtol=0)


def test_batch_workers_share_one_session(tiny_exported, artifact_cache, tiny_reference):
    engine = OnnxRuntimeEngine(tiny_exported, artifact_cache, precision="fp32", device="cpu", threads=1)
    batches = [padded_batch(rows, 40 + seed, seed) for seed, rows in enumerate([8, 3, 5, 2] * 4)]
    with ThreadPoolExecutor(2) as workers:  # as the batcher's model threads call it
        outputs = list(workers.map(engine.forward, batches))
    for batch, output in zip(batches, outputs, strict=True):
        np.testing.assert_allclose(output, tiny_reference.forward(batch), atol=1e-4, rtol=0)


def test_fp32_runs_the_bert_fused_graph(tiny_exported, artifact_cache):
    path = optimized_model(tiny_exported, "fp32", "cpu", artifact_cache)
    operators = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"Attention", "SkipLayerNormalization", "EmbedLayerNormalization"} <= operators


@needs_int8_dot_products
def test_int8_stays_within_its_documented_tolerance(
    tiny_exported, artifact_cache, tiny_reference, tiny_probe
):
    engine = OnnxRuntimeEngine(tiny_exported, artifact_cache, precision="int8", device="cpu", threads=1)
    report = compare(tiny_probe.scores(engine), tiny_probe.scores(tiny_reference), "int8")
    assert report.passed, report.describe()
    assert report.max_abs_diff > 0  # it really ran with int8 weights
    graph = onnx.load(str(optimized_model(tiny_exported, "int8", "cpu", artifact_cache))).graph
    operators = [node.op_type for node in graph.node]
    int8_weights = [init for init in graph.initializer if init.data_type == onnx.TensorProto.INT8]
    # The first layer's three weight MatMuls (Q, K and V sit inside the fused Attention, which stays
    # fp32, as does the last layer). Activations are never quantized.
    assert operators.count("DequantizeLinear") == len(int8_weights) // 2 == 3
    assert not {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger"} & set(operators)


def test_a_model_without_token_type_ids_matches_torch(tmp_path: Path, artifact_cache: ArtifactCache):
    source = ModelSource(str(save_tiny_roberta(tmp_path / "roberta")))
    model = load_cross_encoder(source)
    network = load_network(source, ModelKind.CROSS_ENCODER)
    exported = export_onnx(network, content_hash(network), ("input_ids", "attention_mask"), artifact_cache)
    engine = OnnxRuntimeEngine(exported, artifact_cache, precision="fp32", device="cpu", threads=1)
    probe = cross_encoder_probe(
        model, max_batch_pairs=16, vocab_size=network.model.get_input_embeddings().num_embeddings
    )
    reference = TorchEngine(network, precision="fp32", device="cpu")
    for batch in probe.batches:
        np.testing.assert_allclose(engine.forward(batch), reference.forward(batch), atol=1e-4, rtol=0)


def test_precisions_it_does_not_run_are_refused(tiny_exported, artifact_cache):
    with pytest.raises(ModelLoadError, match="does not run bf16"):
        OnnxRuntimeEngine(tiny_exported, artifact_cache, precision="bf16", device="cpu", threads=1)


def test_documented_tolerances_cover_every_precision():
    assert set(TOLERANCES) == {"fp32", "bf16", "fp16", "int8"}


def test_after_giving_back_its_scratch_memory_it_scores_the_same(tiny_exported, artifact_cache):
    engine = OnnxRuntimeEngine(tiny_exported, artifact_cache, precision="fp32", device="cpu", threads=1)
    large, small = padded_batch(16, 300, seed=2), padded_batch(3, 20, seed=3)
    before = [engine.forward(large), engine.forward(small)]
    engine.release_scratch()
    np.testing.assert_array_equal(engine.forward(small), before[1])
    np.testing.assert_array_equal(engine.forward(large), before[0])


def test_the_fusion_process_fuses_as_the_library_does_in_process(tiny_exported, tmp_path: Path):
    from onnx import numpy_helper

    shape = (tiny_exported.num_heads, tiny_exported.hidden_size, False)
    (tmp_path / "process").mkdir()
    fused = fuse_in_subprocess(tiny_exported.path, tmp_path / "process" / "fused.onnx", *shape)
    assert fuse_export(tiny_exported.path, tmp_path / "in-process.onnx", *shape) == fused  # a small export
    expected = onnx.load(str(tmp_path / "in-process.onnx")).graph
    graph = onnx.load(str(tmp_path / "process" / "fused.onnx")).graph
    assert [node.SerializeToString() for node in graph.node] == [
        node.SerializeToString() for node in expected.node
    ]
    # The weights came back into the one file: none is left outside it.
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in graph.initializer)
    values = {init.name: numpy_helper.to_array(init) for init in expected.initializer}
    assert sorted(init.name for init in graph.initializer) == sorted(values)
    for init in graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(init), values[init.name])
    assert [path.name for path in (tmp_path / "process").iterdir()] == ["fused.onnx"]  # no scratch left


def test_only_an_export_past_the_limit_is_fused_in_a_process_of_its_own(
    tiny_exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    in_processes: list[Path] = []

    def in_a_process(export: Path, *args: object) -> dict[str, int]:
        in_processes.append(export)
        return {}

    monkeypatch.setattr(onnxruntime_fusion, "fuse_in_subprocess", in_a_process)
    shape = (tiny_exported.num_heads, tiny_exported.hidden_size, False)
    fuse_export(tiny_exported.path, tmp_path / "small.onnx", *shape)
    assert in_processes == []
    monkeypatch.setattr(onnxruntime_fusion, "IN_PROCESS_BYTES", tiny_exported.path.stat().st_size - 1)
    fuse_export(tiny_exported.path, tmp_path / "large.onnx", *shape)
    assert in_processes == [tiny_exported.path]


@pytest.mark.parametrize("in_process", [True, False], ids=["in-process", "own-process"])
def test_a_fusion_that_fails_says_which_file(tmp_path: Path, in_process: bool):
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not an onnx file")
    fuse = fuse_export if in_process else fuse_in_subprocess
    with pytest.raises(ModelLoadError, match=r"fusion of .*model\.onnx failed"):
        fuse(broken, tmp_path / "fused.onnx", 2, 32, False)
