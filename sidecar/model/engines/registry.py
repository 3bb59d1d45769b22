"""The engine registry: what each engine offers on a device, and how it is built.

Each engine module declares one ``EngineSpec`` named ``SPEC``; the registry imports a module only when
the chain (or a benchmark) asks for that engine, so a machine without TensorRT never imports it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sidecar.errors import ModelLoadError
from sidecar.model.cache import ArtifactCache
from sidecar.model.calibration import Calibration
from sidecar.model.engines import ENGINE_CHAIN
from sidecar.model.engines.base import Engine
from sidecar.model.export import ExportedModel, export_onnx

if TYPE_CHECKING:
    from sidecar.model.network import Network
    from sidecar.model.parity import ParityReport

# The parity gate's verdict on a built engine's scores: how an engine with several builds of one
# precision (static int8's models) picks the fastest that passes.
Gate = Callable[[Engine], "ParityReport"]


class EngineInputs:
    """What any engine is built from: the network, and its ONNX export, made once on first use.

    A warm start has no network: it passes the export an earlier start made (``exported``, found
    again in a reuse-only cache), and an engine that needs the network cannot be built from it.
    """

    def __init__(
        self,
        network: Network | None,
        model_hash: str,
        input_names: tuple[str, ...],
        cache: ArtifactCache,
        *,
        on_export: Callable[[Callable[[], ExportedModel]], ExportedModel] = lambda export: export(),
        calibration: Calibration | None = None,
        exported: ExportedModel | None = None,
    ) -> None:
        self._network = network
        self.cache = cache
        # The rows static int8 calibrates on; None where no candidate needs them.
        self.calibration = calibration
        self.model_hash = model_hash
        self.input_names = input_names
        self._on_export = on_export  # e.g. times the export as a loading phase
        self._exported = exported
        # Set by the selection; None where nothing gates (benchmarks), and the fastest build serves.
        self.gate: Gate | None = None

    @property
    def network(self) -> Network:
        if self._network is None:
            raise ModelLoadError(
                "this start has no PyTorch network: it rebuilds engines from cached artifacts"
            )
        return self._network

    @property
    def made_export(self) -> ExportedModel | None:
        """The export, when some engine asked for it."""
        return self._exported

    def exported(self) -> ExportedModel:
        if self._exported is None:
            self._exported = self._on_export(
                lambda: export_onnx(self.network, self.model_hash, self.input_names, self.cache)
            )
        return self._exported


@dataclass(frozen=True)
class EngineShape:
    """Where and how an engine runs: the device, each batch worker's threads, and the batch shapes."""

    device: str
    threads: int = 1
    workers: int = 1
    max_batch_pairs: int = 32
    max_batch_tokens: int = 4096
    max_length: int = 512


@dataclass(frozen=True, slots=True)
class Unavailable:
    """Why an engine cannot run on a device at all."""

    reason: str


# What an engine offers on a device: its precisions, fastest first, or why it cannot run there.
Offer = tuple[str, ...] | Unavailable


def offer(unavailable_reason: str | None, precisions: Callable[[], tuple[str, ...]]) -> Offer:
    """``precisions()``, unless there is a reason the engine cannot run."""
    return Unavailable(unavailable_reason) if unavailable_reason else precisions()


@dataclass(frozen=True)
class EngineSpec:
    name: str
    precisions: Callable[[str], Offer]
    build: Callable[[EngineInputs, EngineShape, str], Engine]
    # Precisions the engine has but leaves out on a device, with the reason.
    withheld: Callable[[str], dict[str, str]] = field(default=lambda device: {})


_SPEC_MODULES = {
    "tensorrt": "sidecar.model.engines.tensorrt_engine",
    "onnxruntime": "sidecar.model.engines.onnxruntime_engine",
    "openvino": "sidecar.model.engines.openvino_engine",
    "torch": "sidecar.model.engines.torch_engine",
}
assert tuple(_SPEC_MODULES) == ENGINE_CHAIN, "every engine of the chain is registered, in chain order"


def engine_spec(name: str) -> EngineSpec:
    """The spec of a registered engine; its module is imported now."""
    spec: EngineSpec = importlib.import_module(_SPEC_MODULES[name]).SPEC
    return spec
