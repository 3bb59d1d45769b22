"""Which compiled torch engine a device gets: one graph for every batch shape on a CPU, a CUDA graph
per shape bucket on a GPU."""

from __future__ import annotations

from sidecar.model.batch import ShapeBuckets, TokenBatch
from sidecar.model.engines.base import Engine
from sidecar.model.engines.registry import EngineShape
from sidecar.model.engines.torch_buckets import BucketedTorchEngine
from sidecar.model.engines.torch_engine import TorchEngine
from sidecar.model.network import Network


def compiled_torch_engine(
    network: Network, *, precision: str, shape: EngineShape, sample: TokenBatch, input_names: tuple[str, ...]
) -> Engine:
    """The torch engine compiled by TorchInductor for ``shape``'s device: on CUDA for the batcher's shape
    buckets, each a CUDA graph (``BucketedTorchEngine``); on a CPU with dynamic shapes, tuned on
    ``sample``, since padding to buckets would cost a CPU the padded tokens' arithmetic."""
    if not shape.device.startswith("cuda"):
        return TorchEngine(network, precision=precision, device=shape.device, compile_sample=sample)
    buckets = ShapeBuckets(shape.max_batch_pairs, shape.max_batch_tokens, shape.max_length)
    return BucketedTorchEngine(
        network, precision=precision, device=shape.device, buckets=buckets, input_names=input_names
    )
