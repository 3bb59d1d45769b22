"""Torch compiled by TorchInductor for a fixed set of batch shapes, replayed as CUDA graphs: the compiled
GPU path that needs no TensorRT.

One Inductor graph with symbolic shapes serves every bucket of ``ShapeBuckets``. On CUDA each bucket is
captured once, at build, as a CUDA graph over static input buffers, so a batch costs one copy in, one
graph launch and one copy out, however many kernels the model runs. The graphs share one memory pool and
run one at a time (a lock), so their scratch memory overlaps. On a CPU the engine runs the compiled graph
on the padded batch: the stand-in its bucketing and padding are tested with where no GPU is.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from sidecar.model.batch import ShapeBuckets, TokenBatch
from sidecar.model.engines.base import Engine, require_precision
from sidecar.model.engines.torch_engine import TORCH_DTYPES, torch_batch_variance, torch_precisions
from sidecar.model.network import Network

logger = logging.getLogger(__name__)

# Runs of each bucket before its capture: the first may tune kernels, which a capture cannot hold.
_WARM_UP_RUNS = 2


@dataclass
class _Bucket:
    """One bucket's static inputs, and on CUDA its captured graph and the output it writes."""

    inputs: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph | None = None
    output: torch.Tensor | None = None


class BucketedTorchEngine(Engine):
    name = "torch"
    compiled = True

    def __init__(
        self,
        network: Network,
        *,
        precision: str,
        device: str,
        buckets: ShapeBuckets,
        input_names: tuple[str, ...],
    ) -> None:
        """Compile a copy of ``network`` (fp32, on the CPU) at ``precision`` on ``device`` and, on CUDA,
        capture one graph per bucket; the inputs are ``input_names`` of ``network.forward``."""
        require_precision(self.name, precision, device, torch_precisions(device))
        super().__init__(precision=precision, device=device)
        self.batch_variance = torch_batch_variance(precision)
        self.shape_buckets = buckets
        self._input_names = input_names
        self._graphs = device.startswith("cuda")
        module = copy.deepcopy(network).to(device=device, dtype=TORCH_DTYPES[precision]).eval()
        # Symbolic shapes: one compile serves every bucket (a static compile would repeat per bucket).
        self._module = torch.compile(module, dynamic=True)
        self._lock = threading.Lock()
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle() if self._graphs else None
        with torch.inference_mode(), self._on_device():
            for shape in buckets.shapes:  # largest first, so the shared pool is sized once
                self._buckets[shape] = self._build_bucket(shape, pool)
        logger.info(
            "torch engine compiled by TorchInductor for %d batch shapes%s in %.1f s: %s on %s",
            len(self._buckets),
            ", each a CUDA graph," if self._graphs else "",
            time.perf_counter() - started,
            precision,
            device,
        )

    def _on_device(self) -> contextlib.AbstractContextManager[object]:
        """The engine's GPU made current for this thread; nothing to do on a CPU."""
        return torch.cuda.device(self.device) if self._graphs else contextlib.nullcontext()

    def _build_bucket(self, shape: tuple[int, int], pool: tuple[int, int] | None) -> _Bucket:
        inputs = {
            name: torch.zeros(shape, dtype=torch.int64, device=self.device) for name in self._input_names
        }
        inputs["attention_mask"].fill_(1)
        bucket = _Bucket(inputs)
        if not self._graphs:
            self._module(*inputs.values())
            return bucket
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(_WARM_UP_RUNS):
                self._module(*inputs.values())
        torch.cuda.current_stream().wait_stream(side)
        bucket.graph = torch.cuda.CUDAGraph()
        # Thread-local capture: the batcher's model threads may use the device meanwhile.
        with torch.cuda.graph(bucket.graph, pool=pool, capture_error_mode="thread_local"):
            bucket.output = self._module(*inputs.values())
        return bucket

    def forward(self, batch: TokenBatch) -> np.ndarray:
        rows, columns = batch.shape
        _, column_bound = self.shape_buckets.fit(1, columns)
        step = self.shape_buckets.row_bounds(column_bound)[-1]
        if rows > step:  # larger than the batcher forms: in bucket-sized slices
            parts = [batch.rows(start, start + step) for start in range(0, rows, step)]
            return np.concatenate([self.forward(part) for part in parts])
        shape = self.shape_buckets.fit(rows, columns)
        padded = batch.padded_to(*shape, pad_token_id=0)
        arrays = padded.as_dict()
        bucket = self._buckets[shape]
        with self._lock, torch.inference_mode(), self._on_device():
            for name in self._input_names:
                bucket.inputs[name].copy_(torch.from_numpy(arrays[name]))
            if bucket.graph is not None:
                bucket.graph.replay()
                output = bucket.output
            else:
                output = self._module(*bucket.inputs.values())
            assert output is not None
            return output[:rows].float().cpu().numpy()

    def close(self) -> None:
        self._buckets.clear()
