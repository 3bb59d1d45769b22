"""The ONNX export: what it leaves of the network it traced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sidecar.model.cache import ArtifactCache
from sidecar.model.export import export_onnx
from sidecar.model.kinds import load_network
from sidecar.model.loading import ModelKind, ModelSource
from sidecar.model.network import content_hash
from tests.model.conftest import CROSS_ENCODER_INPUTS
from tests.models import padded_batch, save_tiny_bert


def scores(network: torch.nn.Module) -> np.ndarray:
    batch = padded_batch(4, 24, seed=5)
    with torch.inference_mode():
        outputs = network(*(torch.from_numpy(array).long() for array in batch.as_dict().values()))
    return outputs.numpy()


def test_an_fp32_network_is_traced_in_place_and_left_as_it_was(tmp_path: Path):
    network = load_network(ModelSource(str(save_tiny_bert(tmp_path / "bert"))), ModelKind.CROSS_ENCODER)
    network.model.set_attn_implementation("sdpa")
    before = scores(network)
    exported = export_onnx(
        network, content_hash(network), CROSS_ENCODER_INPUTS, ArtifactCache(tmp_path / "cache")
    )
    assert exported.path.is_file()
    assert network.model.config._attn_implementation == "sdpa"
    assert not network.training
    np.testing.assert_array_equal(scores(network), before)


def test_a_bf16_network_is_exported_from_an_fp32_copy(tmp_path: Path):
    network = load_network(ModelSource(str(save_tiny_bert(tmp_path / "bert"))), ModelKind.CROSS_ENCODER)
    network = network.to(torch.bfloat16)
    exported = export_onnx(
        network, content_hash(network), CROSS_ENCODER_INPUTS, ArtifactCache(tmp_path / "cache")
    )
    assert exported.path.is_file()
    assert all(weight.dtype == torch.bfloat16 for weight in network.parameters())
