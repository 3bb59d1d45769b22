"""Engines behind one interface, each imported only when chosen."""

from __future__ import annotations

from sidecar.model.engines.base import Engine
from sidecar.model.loading import ModelSource

ENGINE_CHOICES = ("auto", "torch")


def load_engine(engine: str, source: ModelSource, *, device: str, threads: int) -> Engine:
    """Load the requested engine; ``auto`` picks the best one available."""
    if engine not in ENGINE_CHOICES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINE_CHOICES)}")
    from sidecar.model.engines.torch_engine import TorchEngine

    return TorchEngine(source, device=device, threads=threads)


__all__ = ["ENGINE_CHOICES", "Engine", "load_engine"]
