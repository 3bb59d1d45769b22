"""Fixtures for the engine tests: the tiny cross-encoder loaded, probed and exported once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.model.cache import ArtifactCache
from sidecar.model.calibration import Calibration, model_calibration, read_calibration
from sidecar.model.engines.selection import EngineRequest
from sidecar.model.engines.torch_engine import TorchEngine
from sidecar.model.export import ExportedModel, export_onnx
from sidecar.model.kinds import load_network
from sidecar.model.loading import CrossEncoderModel, ModelKind, ModelSource, load_cross_encoder
from sidecar.model.network import Network, content_hash
from sidecar.model.parity import Probe, cross_encoder_probe

CROSS_ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def engine_request(
    cache_dir: Path, engine: str = "auto", precision: str = "fp32", torch_compile: str = "off"
) -> EngineRequest:
    """A selection request on the CPU with one thread and small batches, as the model tests use."""
    return EngineRequest(
        engine=engine,
        precision=precision,
        device="cpu",
        threads=1,
        max_batch_pairs=8,
        max_batch_tokens=1024,
        max_length=128,
        cache_dir=cache_dir,
        torch_compile=torch_compile,
    )


@pytest.fixture(scope="session")
def artifact_cache(tmp_path_factory: pytest.TempPathFactory) -> ArtifactCache:
    return ArtifactCache(tmp_path_factory.mktemp("engine-cache"))


@pytest.fixture(scope="session")
def tiny_model(tiny_bert: Path) -> CrossEncoderModel:
    return load_cross_encoder(ModelSource(str(tiny_bert)))


@pytest.fixture(scope="session")
def tiny_network(tiny_bert: Path) -> Network:
    return load_network(ModelSource(str(tiny_bert)), ModelKind.CROSS_ENCODER)


@pytest.fixture(scope="session")
def tiny_reference(tiny_network: Network) -> TorchEngine:
    return TorchEngine(tiny_network, precision="fp32", device="cpu")


@pytest.fixture(scope="session")
def tiny_probe(tiny_model: CrossEncoderModel, tiny_network: Network) -> Probe:
    vocab_size = tiny_network.model.get_input_embeddings().num_embeddings
    return cross_encoder_probe(tiny_model, max_batch_pairs=32, vocab_size=vocab_size)


@pytest.fixture(scope="session")
def tiny_exported(tiny_network: Network, artifact_cache: ArtifactCache) -> ExportedModel:
    return export_onnx(tiny_network, content_hash(tiny_network), CROSS_ENCODER_INPUTS, artifact_cache)


@pytest.fixture(scope="session")
def tiny_calibration(tiny_model: CrossEncoderModel) -> Calibration:
    return model_calibration(tiny_model, read_calibration(""))
