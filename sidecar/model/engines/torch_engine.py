"""The fallback engine, and the parity gate's reference: the model's own PyTorch forward pass."""

from __future__ import annotations

import contextlib
import copy
import logging
import time

import numpy as np
import torch

from sidecar.errors import ModelLoadError
from sidecar.model.batch import TokenBatch
from sidecar.model.engines import TORCH_COMPILE_CHOICES
from sidecar.model.engines.base import Engine, require_precision
from sidecar.model.engines.registry import EngineInputs, EngineShape, EngineSpec
from sidecar.model.network import Network

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {requested} was requested but torch sees no CUDA device")
    return requested


def cpu_supports_bf16() -> bool:
    """Whether the CPU has native bf16 arithmetic (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def torch_precisions(device: str) -> tuple[str, ...]:
    """Precisions the torch engine offers on this device, fastest first."""
    if device.startswith("cuda"):
        return ("fp16", "bf16", "fp32") if torch.cuda.is_bf16_supported() else ("fp16", "fp32")
    return ("bf16", "fp32") if cpu_supports_bf16() else ("fp32",)


def torch_batch_variance(precision: str) -> str:
    """Why torch's outputs at ``precision`` move with what shares their batch; empty for fp32."""
    if precision == "fp32":
        return ""
    return (
        f"{precision} rounds every matrix product's output and the kernels are picked by the batch's "
        "shape, so a pair's score moves with what shares its batch"
    )


def compile_wanted(setting: str, device: str) -> bool:
    """Whether ``--torch-compile`` asks for TorchInductor: auto compiles wherever torch serves, on the CPU
    in the background once the server is SERVING, on CUDA before it (see ``torch_compiled``)."""
    if setting not in TORCH_COMPILE_CHOICES:
        raise ModelLoadError(
            f"unknown --torch-compile {setting!r}; choose one of {', '.join(TORCH_COMPILE_CHOICES)}"
        )
    return setting in ("on", "auto")


class TorchEngine(Engine):
    name = "torch"

    def __init__(
        self,
        network: Network,
        *,
        precision: str = "fp32",
        device: str = "cpu",
        compile_sample: TokenBatch | None = None,
    ) -> None:
        """Serve ``network`` (fp32, on the CPU) at ``precision`` on ``device``.

        fp32 on the CPU runs the given network itself; other precisions and devices, and compiled
        engines, run a copy, so the caller's network stays the fp32 reference.

        With ``compile_sample`` the network is compiled by TorchInductor with frozen weights (the
        linear layers become prepacked oneDNN or MKL kernels, bias and activation fused in) and
        dynamic shapes, then run once on the sample, whose shape guides the kernel choices: give it the
        batcher's full batch.
        """
        require_precision(self.name, precision, device, torch_precisions(device))
        super().__init__(precision=precision, device=device)
        self.batch_variance = torch_batch_variance(precision)
        dtype = TORCH_DTYPES[precision]
        if dtype == torch.float32 and device == "cpu" and compile_sample is None:
            self._network = network
        else:
            # Whole-model low-precision weights, not autocast: faster on CPU (benchmarks/engines.py).
            self._network = copy.deepcopy(network).to(device=device, dtype=dtype)
        self._network.eval()
        self.compiled = compile_sample is not None
        self._module: torch.nn.Module = self._network
        if compile_sample is not None:
            self._module = torch.compile(self._network, dynamic=True)  # type: ignore[assignment]
            started = time.perf_counter()
            self.forward(compile_sample)
            logger.info(
                "torch engine compiled by TorchInductor in %.1f s (warm-up batch %dx%d)",
                time.perf_counter() - started,
                *compile_sample.shape,
            )
        logger.info(
            "torch engine ready: %s on %s%s, %d threads",
            precision,
            device,
            ", compiled" if self.compiled else "",
            torch.get_num_threads(),
        )

    def forward(self, batch: TokenBatch) -> np.ndarray:
        arrays = list(batch.as_dict().values())
        rows = len(arrays[0])
        if self.compiled:
            arrays = _at_least_two_by_two(arrays)
        inputs = [torch.from_numpy(array).to(self.device) for array in arrays]
        # Freezing is read from Inductor's global config when a graph compiles (the per-call
        # ``options`` of torch.compile do not reach it), so it is set around every call that could.
        frozen = torch._inductor.config.patch(freezing=True) if self.compiled else contextlib.nullcontext()
        with torch.inference_mode(), frozen:
            outputs = self._module(*inputs)
        return outputs[:rows].float().cpu().numpy()


def _at_least_two_by_two(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Pad a batch of one row or one column to two.

    Dynamic shapes specialize sizes 0 and 1, so without this a single pair would compile a second
    graph (seconds of latency on the first such request). The row is repeated and its output
    dropped; the extra column is zeros, attention mask included, so no position attends to it.
    """
    rows, columns = arrays[0].shape
    if rows < 2:
        arrays = [np.pad(array, ((0, 2 - rows), (0, 0)), mode="edge") for array in arrays]
    if columns < 2:
        arrays = [np.pad(array, ((0, 0), (0, 2 - columns))) for array in arrays]
    return arrays


def _build(inputs: EngineInputs, shape: EngineShape, precision: str) -> Engine:
    return TorchEngine(inputs.network, precision=precision, device=shape.device)


SPEC = EngineSpec("torch", torch_precisions, _build)
