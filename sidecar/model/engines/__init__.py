"""Engines behind one interface, each imported only when chosen (see ``selection`` for the chain)."""

from __future__ import annotations

from sidecar.model.engines.base import Engine

# The fallback chain, best first; `auto` tries them in this order.
ENGINE_CHAIN = ("tensorrt", "onnxruntime", "openvino", "torch")
ENGINE_CHOICES = ("auto", *ENGINE_CHAIN)
# Engines that run the PyTorch network itself rather than a compiled artifact: they need the network at
# every start (so no torch-free warm start), and TorchInductor may compile them once chosen.
NETWORK_ENGINES = frozenset({"torch"})
PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16", "int8")
TORCH_COMPILE_CHOICES = ("auto", "on", "off")

__all__ = [
    "ENGINE_CHAIN",
    "ENGINE_CHOICES",
    "NETWORK_ENGINES",
    "PRECISION_CHOICES",
    "TORCH_COMPILE_CHOICES",
    "Engine",
]
