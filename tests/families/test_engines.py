"""Engine details that differ by family: the inputs an export declares, and which layers int8 finds."""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest

from sidecar.model.cache import ArtifactCache
from sidecar.model.engines.onnxruntime_engine import optimized_model
from sidecar.model.export import ExportedModel, export_onnx
from sidecar.model.kinds import load_model_network
from sidecar.model.loading import ModelSource, load_cross_encoder
from sidecar.model.network import content_hash
from tests.conditions import needs_int8_dot_products
from tests.families.conftest import FamilyModels

ALL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
LAYER = re.compile(r"/layers?\.(\d+)/")


def exported(model_dir: Path, cache: ArtifactCache) -> ExportedModel:
    model = load_cross_encoder(ModelSource(str(model_dir)))
    network = load_model_network(model)
    offered = ALL_INPUTS if model.uses_token_type_ids else ALL_INPUTS[:2]
    return export_onnx(network, content_hash(network), offered, cache)


@pytest.mark.parametrize(
    ("family", "inputs"),
    [
        ("bert", ALL_INPUTS),
        # Its tokenizer gives token type ids, but with no token type embeddings the graph drops them.
        ("deberta-v2", ALL_INPUTS[:2]),
        ("xlm-roberta", ALL_INPUTS[:2]),
    ],
)
def test_the_export_declares_only_the_inputs_the_model_reads(
    family: str, inputs: tuple[str, ...], family_models: FamilyModels, tmp_path: Path
):
    assert exported(family_models[family], ArtifactCache(tmp_path)).input_names == inputs


@needs_int8_dot_products
@pytest.mark.parametrize("family", ["deberta-v2", "modernbert", "qwen3-reranker"])
def test_int8_quantizes_every_layer_but_the_last(family: str, family_models: FamilyModels, tmp_path: Path):
    """Layers are named layers.N (ModernBERT, decoders) as well as layer.N (BERT, DeBERTa)."""
    cache = ArtifactCache(tmp_path)
    path = optimized_model(exported(family_models[family], cache), "int8", "cpu", cache)
    matmuls = [node for node in onnx.load(str(path)).graph.node if node.op_type == "MatMul"]
    layers = {int(match.group(1)) for node in matmuls if (match := LAYER.search(node.name))}
    quantized = {
        int(match.group(1))
        for node in matmuls
        if node.input[1].endswith(".dequantized") and (match := LAYER.search(node.name))
    }
    assert len(layers) > 1
    assert quantized == layers - {max(layers)}
