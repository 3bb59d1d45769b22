"""ONNX export shared by ONNX Runtime and TensorRT, cached on disk by model content and library versions."""

from __future__ import annotations

import copy
import importlib.metadata
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.errors import ModelLoadError
from sidecar.model.cache import ArtifactCache

if TYPE_CHECKING:
    from sidecar.model.network import Network

logger = logging.getLogger(__name__)

OPSET = 17
OUTPUT_NAME = "outputs"
# A small example shape: the axes are dynamic, and the traced graph does not depend on it.
_EXAMPLE_ROWS, _EXAMPLE_COLUMNS = 2, 16


@dataclass(frozen=True)
class ExportedModel:
    """An ONNX file of a network and what the compiled engines need to know about it."""

    path: Path
    fingerprint: str
    # The inputs the graph declares, in order: the exporter drops an input the model never reads
    # (DeBERTa-v2 without token type embeddings ignores token_type_ids), and engines feed only these.
    input_names: tuple[str, ...]
    model_type: str
    num_heads: int
    hidden_size: int


def library_versions() -> dict[str, str]:
    """The versions of the libraries an export depends on, read from their package metadata, so a
    warm start learns them without importing torch."""
    return {package: importlib.metadata.version(package) for package in ("torch", "transformers", "onnx")}


def export_onnx(
    network: Network, fingerprint: str, input_names: tuple[str, ...], cache: ArtifactCache
) -> ExportedModel:
    """The network as ONNX (fp32 outputs, dynamic batch and sequence axes), from the cache when valid."""
    config = network.model.config
    key = _export_key(fingerprint, input_names)
    path = cache.get_or_build("onnx", key, "model.onnx", lambda target: _export(network, input_names, target))
    return ExportedModel(
        path=path,
        fingerprint=fingerprint,
        input_names=graph_inputs(path),
        model_type=config.model_type,
        num_heads=int(getattr(config, "num_attention_heads", 0)),
        hidden_size=int(getattr(config, "hidden_size", 0)),
    )


def cached_export(
    description: Mapping[str, Any], input_names: tuple[str, ...], cache: ArtifactCache
) -> ExportedModel:
    """The export an earlier start made, found again in ``cache`` with no network to export from:
    ``description`` holds its fields but the path. A missing, damaged or stale file raises
    a ModelLoadError."""
    fields = {**description, "input_names": tuple(description["input_names"])}
    path = cache.cached("onnx", _export_key(fields["fingerprint"], input_names), "model.onnx")
    return ExportedModel(path=path, **fields)


def _export_key(fingerprint: str, input_names: tuple[str, ...]) -> dict[str, str]:
    return {"model": fingerprint, "inputs": ",".join(input_names), "opset": str(OPSET), **library_versions()}


def graph_inputs(path: Path) -> tuple[str, ...]:
    """The names of the inputs an ONNX file declares, read without its weights."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {initializer.name for initializer in graph.initializer}
    return tuple(value.name for value in graph.input if value.name not in weights)


def _export(network: Network, input_names: tuple[str, ...], target: Path) -> None:
    import torch

    logger.info("exporting the model to ONNX (opset %d) at %s", OPSET, target)
    example = tuple(
        torch.ones(_EXAMPLE_ROWS, _EXAMPLE_COLUMNS, dtype=torch.int64)
        if name != "token_type_ids"
        else torch.zeros(_EXAMPLE_ROWS, _EXAMPLE_COLUMNS, dtype=torch.int64)
        for name in input_names
    )
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    dynamic_axes[OUTPUT_NAME] = {0: "batch"}
    try:
        with _traceable(network) as exported, torch.inference_mode():
            torch.onnx.export(
                exported,
                example,
                str(target),
                input_names=list(input_names),
                output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as exc:  # the exporter raises many types for unsupported graphs
        raise ModelLoadError(f"could not export the model to ONNX: {type(exc).__name__}: {exc}") from exc


@contextmanager
def _traceable(network: Network) -> Iterator[Network]:
    """The network with eager attention, fp32 on the CPU, to trace: ONNX Runtime's BERT fusion recognises
    the eager attention pattern, not the SDPA one, and only in graphs from the TorchScript exporter.

    A network already fp32 on the CPU is switched to eager attention and back, so the export does not
    hold a second copy of the weights (a base-sized model's start-up peaks there); any other is copied.
    """
    import torch

    on_cpu_in_fp32 = all(
        parameter.device.type == "cpu" and parameter.dtype == torch.float32
        for parameter in network.parameters()
    )
    if not on_cpu_in_fp32:
        exported = copy.deepcopy(network).float().cpu().eval()
        exported.model.set_attn_implementation("eager")
        yield exported
        return
    config = network.model.config
    previous = config._attn_implementation
    was_training = network.training
    network.model.set_attn_implementation("eager")
    network.eval()
    try:
        yield network
    finally:
        network.model.set_attn_implementation(previous)
        network.train(was_training)
