"""The fallback engine, and the parity gate's reference: the model's own PyTorch forward pass."""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch

from sidecar.errors import ModelLoadError
from sidecar.model.batch import TokenBatch
from sidecar.model.engines.base import Engine
from sidecar.model.network import Network

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, network: Network, *, precision: str = "fp32", device: str = "cpu") -> None:
        """Serve ``network`` (fp32, on the CPU) at ``precision`` on ``device``.

        fp32 on the CPU runs the given network itself; other precisions and devices run a copy,
        so the caller's network stays the fp32 reference.
        """
        if precision not in torch_precisions(device):
            raise ModelLoadError(
                f"the torch engine does not run {precision} on {device}; it offers "
                f"{', '.join(torch_precisions(device))} there"
            )
        super().__init__(precision=precision, device=device)
        dtype = _DTYPES[precision]
        if dtype == torch.float32 and device == "cpu":
            self._network = network
        else:
            # Whole-model low-precision weights, not autocast: measured about 10% faster on CPU.
            self._network = copy.deepcopy(network).to(device=device, dtype=dtype)
        self._network.eval()
        logger.info("torch engine ready: %s on %s, %d threads", precision, device, torch.get_num_threads())

    def forward(self, batch: TokenBatch) -> np.ndarray:
        inputs = [torch.from_numpy(array).to(self.device) for array in batch.as_dict().values()]
        with torch.inference_mode():
            outputs = self._network(*inputs)
        return outputs.float().cpu().numpy()
