"""The serving path's own cost, without the model's arithmetic: what caps a GPU sidecar on its CPU side.

The sidecar runs as a subprocess whose engine does no arithmetic: it waits as a GPU would (one batch at a
time, for a time proportional to the padded tokens) and answers zeros, with the GPU engine's shape
buckets, so the transport, tokenization, batching and Python overhead are all that is measured. While
the callers' level runs, py-spy samples which code holds the sidecar's GIL: on the NVIDIA H200 the GIL,
not the GPU, capped throughput (benchmarks/RESULTS.md, "NVIDIA H200"), and this measures it on any CPU.

    .venv/bin/python -m benchmarks.serving_overhead [--levels 1 16] [--seconds 10] [--gpu-ms 3.4]
        [--tokenize-in processes threads] [--rounds 1]

Each ``--tokenize-in`` mode gets a sidecar of its own, in turn, each round. Writes
benchmarks/out/serving_overhead.json: per mode and level, pairs/s, latency, the server's tokenization
time, and the GIL's held share with the GIL milliseconds each request costs and the functions holding it
most.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import grpc
import numpy as np

from benchmarks.harness import OUT, QUERY, build_model, candidates, gil_sampler, gil_summary, hardware_record
from client.local_sidecar import free_port
from rerank.v1 import rerank_pb2, rerank_pb2_grpc
from sidecar.settings import TOKENIZE_IN_CHOICES

MAX_LENGTH = 256
# The GPU defaults' batch limits (sidecar/serving/runtime.py), so batches and buckets are the GPU's.
GPU_BATCH_PAIRS, GPU_BATCH_TOKENS = 256, 32768


@dataclasses.dataclass
class Level:
    tokenize_in: str
    turn: int
    callers: int
    seconds: float
    requests: int = 0
    pairs_per_s: float = 0.0
    p50_ms: float = 0.0
    tokenization_p50_ms: float = 0.0
    gil_ms_per_request: float = 0.0
    gil_profile: dict[str, object] = dataclasses.field(default_factory=dict)


def serve(port: int, model_dir: Path, gpu_ms: float, tokenize_in: str) -> None:
    """The sidecar in this process, its engine swapped for ``GpuStandIn`` once loaded."""
    from sidecar.model.batch import ShapeBuckets, TokenBatch
    from sidecar.model.engines.base import Engine
    from sidecar.model.loading import ModelSource
    from sidecar.server import SidecarServer
    from sidecar.serving.runtime import Runtime, load_runtime
    from sidecar.settings import Settings

    class GpuStandIn(Engine):
        """Waits ``gpu_ms`` per 112 x 256 padded tokens, one batch at a time, and answers zeros."""

        name = "torch"

        def __init__(self) -> None:
            super().__init__(precision="fp16", device="cuda")
            self.shape_buckets = ShapeBuckets(GPU_BATCH_PAIRS, GPU_BATCH_TOKENS, MAX_LENGTH)
            self._one_at_a_time = threading.Lock()

        def forward(self, batch: TokenBatch) -> np.ndarray:
            rows, columns = batch.shape
            with self._one_at_a_time:
                time.sleep(gpu_ms / 1000 * rows * columns / (112 * 256))
            return np.zeros((rows, 1), dtype=np.float32)

    def runtime(settings: Settings, source: ModelSource) -> Runtime:
        return dataclasses.replace(load_runtime(settings, source), engine=GpuStandIn())

    settings = Settings(
        model=str(model_dir),
        engine="torch",
        precision="fp32",
        torch_compile="off",
        embed_model="",
        score_cache_size=0,  # the same request repeats: every answer must come from the stand-in
        metrics_port=0,
        host="127.0.0.1",
        port=port,
        batch_workers=1,
        max_length=MAX_LENGTH,
        max_batch_tokens=GPU_BATCH_TOKENS,
        max_batch_pairs=GPU_BATCH_PAIRS,
        cache_dir=str(OUT / "cache"),
        log_level="WARNING",
        tokenize_in=tokenize_in,
    )

    async def run() -> None:
        server = SidecarServer(settings, runtime_factory=runtime)
        await server.start()
        await server.load()
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


async def closed_loop(port: int, request: rerank_pb2.RerankRequest, level: Level) -> Level:
    callers, seconds = level.callers, level.seconds
    latencies: list[float] = []
    tokenization: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rerank_pb2_grpc.RerankerStub(channel)
        stop_at = time.monotonic() + seconds

        async def caller() -> None:
            while time.monotonic() < stop_at:
                started = time.monotonic()
                response = await stub.Rerank(request, timeout=60)
                if time.monotonic() <= stop_at:
                    latencies.append(time.monotonic() - started)
                    tokenization.append(response.usage.tokenization_ns / 1e6)

        await asyncio.gather(*(caller() for _ in range(callers)))
    level.requests = len(latencies)
    level.pairs_per_s = len(latencies) * len(request.documents) / seconds
    level.p50_ms = float(np.median(latencies)) * 1000
    level.tokenization_p50_ms = float(np.median(tokenization))
    return level


def measure(
    args: argparse.Namespace, model_dir: Path, request: rerank_pb2.RerankRequest, tokenize_in: str, turn: int
) -> list[dict[str, object]]:
    """One sidecar tokenizing in ``tokenize_in``, through every level."""
    port = free_port()
    command = [sys.executable, "-m", "benchmarks.serving_overhead", "--serve-port", str(port)]
    command += ["--gpu-ms", str(args.gpu_ms), "--tokenize-in", tokenize_in]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    levels = []
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != b"ready":
            raise RuntimeError("the sidecar did not start")
        asyncio.run(closed_loop(port, request, Level(tokenize_in, turn, 1, 3.0)))  # warm-up
        for callers in args.levels:
            sampler = gil_sampler(server.pid, args.seconds - 2)
            level = asyncio.run(closed_loop(port, request, Level(tokenize_in, turn, callers, args.seconds)))
            if sampler is not None:
                level.gil_profile = gil_summary(sampler, args.seconds - 2)
                held = float(level.gil_profile.get("gil_held_share", 0.0))  # type: ignore[arg-type]
                level.gil_ms_per_request = held * args.seconds * 1000 / max(1, level.requests)
            print(json.dumps({k: v for k, v in asdict(level).items() if k != "gil_profile"}), flush=True)
            levels.append(asdict(level))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--gpu-ms", type=float, default=3.4, help="the stand-in's ms per 112 x 256 tokens")
    parser.add_argument(
        "--tokenize-in", nargs="+", default=["processes", "threads"], choices=TOKENIZE_IN_CHOICES[1:]
    )
    parser.add_argument("--rounds", type=int, default=1, help="each mode in turn, this many times")
    parser.add_argument("--serve-port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dir = build_model(OUT / "minilm-l6-cross-encoder")
    if args.serve_port:
        serve(args.serve_port, model_dir, args.gpu_ms, args.tokenize_in[0])
        return
    texts = candidates(model_dir)
    request = rerank_pb2.RerankRequest(
        query=QUERY,
        documents=[rerank_pb2.Document(id=str(i), text=text) for i, text in enumerate(texts)],
        max_length=MAX_LENGTH,
    )
    levels = [
        level
        for turn in range(1, args.rounds + 1)
        for tokenize_in in args.tokenize_in
        for level in measure(args, model_dir, request, tokenize_in, turn)
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    record = {"hardware": hardware_record(), "gpu_ms_per_112x256": args.gpu_ms, "levels": levels}
    (OUT / "serving_overhead.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
