"""Closed-loop load on the sidecar over gRPC (or half over HTTP): throughput and latency, and a soak.

Each caller sends one 100-candidate Rerank request (the engines benchmark's workload: about 230
tokens a pair, max_length 256), waits for the answer, and sends the next, until the level's time
is up. A RESOURCE_EXHAUSTED answer counts as refused and the caller backs off (exponentially, with
jitter, from 0.1 s to 3.2 s). The model
has MiniLM-L6 shape with real encoder weights (see benchmarks/harness.py); only speed is measured.

    .venv/bin/python -m benchmarks.load [--levels 1 4 16 64] [--seconds 60] [--engine auto]
    .venv/bin/python -m benchmarks.load --soak-seconds 300 --soak-callers 16   # memory sampled every 10 s
    .venv/bin/python -m benchmarks.load --soak-seconds 600 --soak-callers 4 --soak-workload varied \
        --embed-model sentence-transformers/all-MiniLM-L6-v2   # the default sidecar, ever new batch shapes
    .venv/bin/python -m benchmarks.load --mixed --levels 4 16   # half HTTP, half gRPC, one queue
    .venv/bin/python -m benchmarks.load --two-models --levels 4 --seconds 30   # two models, one sidecar
    .venv/bin/python -m benchmarks.load --score-cache --cache-seconds 15   # the score cache, on and off

The sidecar runs as a subprocess on 127.0.0.1 with its own settings (queue limit included), so the
numbers include the transport, tokenization and batching. Writes benchmarks/out/load.json and, for
the levels, benchmarks/out/load.png; --mixed writes benchmarks/out/load-mixed.json, a level per
transport, with the fewest and most answers any one caller got. --two-models serves the MiniLM-L6
model ("fast") beside a 12-layer one made of its layers twice over ("slow") and loads each alone, then
both at once with as many callers each, into benchmarks/out/load-two-models.json: each model's
throughput together against alone.

--score-cache runs one caller through two workloads on a sidecar with the score cache on, then on one
with it off (``--score-cache-size 0``; every other benchmark runs it off): pagination, the same query
with the next 100 SciFact passages, each page overlapping the last by half, and the levels' 100-candidate
request repeated. It writes benchmarks/out/load-score-cache.json: per workload and cache setting the
hit rate (from Usage.cached_pairs) and the latencies, with the bytes one cached pair takes.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np

from benchmarks.harness import (
    OUT,
    QUERY,
    Sidecar,
    build_deeper_model,
    build_model,
    candidates,
    corpus_texts,
    hardware_record,
    start_sidecar,
)
from client.local_sidecar import free_port
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

# A refused caller backs off exponentially with jitter, as the README tells clients to.
_FIRST_BACKOFF_S, _MAX_BACKOFF_S = 0.1, 3.2


@dataclass
class Level:
    callers: int
    seconds: float
    transport: str = "grpc"
    ok: int = 0
    refused: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    pairs_per_s: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    refused_share: float = 0.0
    # The fewest and most answers one caller got: a fewest of 0 means a caller starved.
    fewest_per_caller: int = 0
    most_per_caller: int = 0
    # What an autoscaler sees (gRPC levels): the mean pairs queued over the level, from the rate of
    # rerank_queued_pair_seconds_total, and each answered request's queue wait (its Usage).
    mean_queued_pairs: float = 0.0
    queue_wait_p50_ms: float = 0.0
    queue_wait_p99_ms: float = 0.0
    # Where an answered request's time went inside the server (gRPC levels, medians of its Usage):
    # tokenizing, the model batches that carried it, and all of it; the caller's latency less the
    # server's total is the transport's and the client's share.
    tokenization_p50_ms: float = 0.0
    inference_p50_ms: float = 0.0
    server_total_p50_ms: float = 0.0


# What one call came to: "ok", "refused" (the queue was full), or the error's name.
Call = Callable[[], Awaitable[str]]


def grpc_call(
    stub: rerank_pb2_grpc.RerankerStub,
    requests: Iterator[rerank_pb2.RerankRequest],
    usages: list[rerank_pb2.Usage],
) -> Call:
    """A Rerank call of the next of ``requests`` that appends each answer's Usage (its server-side
    timings) to ``usages``."""

    async def call() -> str:
        try:
            response = await stub.Rerank(next(requests), timeout=600)
        except grpc.aio.AioRpcError as error:
            return "refused" if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else error.code().name
        usages.append(response.usage)
        return "ok"

    return call


def http_call(client: httpx.AsyncClient, request: rerank_pb2.RerankRequest) -> Call:
    """The same request as Cohere's POST /v2/rerank (max_tokens_per_doc is the same pair budget)."""
    body = {
        "model": "",
        "query": request.query,
        "documents": [document.text for document in request.documents],
        "max_tokens_per_doc": request.max_length,
    }

    async def call() -> str:
        response = await client.post("/v2/rerank", json=body, timeout=600)
        if response.status_code == 429:
            return "refused"
        return "ok" if response.status_code == 200 else f"HTTP {response.status_code}"

    return call


async def closed_loop(calls: dict[str, list[Call]], documents: int, seconds: float) -> list[Level]:
    """Each caller calls, waits for the answer, and calls again until the time is up; one Level per
    transport (the keys of ``calls``, each with its callers)."""
    stop_at = time.monotonic() + seconds

    async def caller(call: Call, latencies: list[float], outcomes: Counter[str]) -> int:
        backoff, answered = _FIRST_BACKOFF_S, 0
        while time.monotonic() < stop_at:
            started = time.monotonic()
            outcome = await call()
            if outcome == "refused":
                outcomes["refused"] += 1
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(2 * backoff, _MAX_BACKOFF_S)
                continue
            if outcome != "ok":
                outcomes[outcome] += 1
                continue
            backoff = _FIRST_BACKOFF_S
            # Count only answers that finish inside the window, so the rate is not inflated.
            if time.monotonic() <= stop_at:
                answered += 1
                latencies.append(time.monotonic() - started)
        return answered

    latencies: dict[str, list[float]] = {transport: [] for transport in calls}
    outcomes: dict[str, Counter[str]] = {transport: Counter() for transport in calls}
    answered = await asyncio.gather(
        *(
            asyncio.gather(
                *(caller(call, latencies[transport], outcomes[transport]) for call in transport_calls)
            )
            for transport, transport_calls in calls.items()
        )
    )
    levels = []
    for (transport, transport_calls), per_caller in zip(calls.items(), answered, strict=True):
        level = Level(len(transport_calls), seconds, transport)
        level.ok = sum(per_caller)
        level.refused = outcomes[transport].pop("refused", 0)
        level.errors = dict(outcomes[transport])
        level.pairs_per_s = level.ok * documents / seconds
        if latencies[transport]:
            p50, p95, p99 = np.percentile(latencies[transport], [50, 95, 99]) * 1000
            level.p50_ms, level.p95_ms, level.p99_ms = float(p50), float(p95), float(p99)
        level.refused_share = level.refused / max(1, level.refused + level.ok)
        level.fewest_per_caller, level.most_per_caller = min(per_caller), max(per_caller)
        levels.append(level)
    return levels


def queued_pair_seconds(metrics_port: int) -> float:
    """The sidecar's rerank_queued_pair_seconds_total, summed over its models."""
    body = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith("rerank_queued_pair_seconds_total{")
    )


async def run_level(
    sidecar: Sidecar,
    request: rerank_pb2.RerankRequest,
    callers: int,
    seconds: float,
    requests: Iterator[rerank_pb2.RerankRequest] | None = None,
) -> Level:
    """``callers`` callers sending ``request``, or the next of ``requests`` (as many documents each)."""
    usages: list[rerank_pb2.Usage] = []
    area_before, started = queued_pair_seconds(sidecar.metrics_port), time.monotonic()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        stub = rerank_pb2_grpc.RerankerStub(channel)
        call = grpc_call(stub, requests or itertools.repeat(request), usages)
        (level,) = await closed_loop({"grpc": [call] * callers}, len(request.documents), seconds)
    elapsed = time.monotonic() - started
    level.mean_queued_pairs = (queued_pair_seconds(sidecar.metrics_port) - area_before) / elapsed
    if usages:
        p50, p99 = np.percentile([usage.queue_ns for usage in usages], [50, 99]) / 1e6
        level.queue_wait_p50_ms, level.queue_wait_p99_ms = float(p50), float(p99)
        level.tokenization_p50_ms = float(np.median([usage.tokenization_ns for usage in usages])) / 1e6
        level.inference_p50_ms = float(np.median([usage.inference_ns for usage in usages])) / 1e6
        level.server_total_p50_ms = float(np.median([usage.total_ns for usage in usages])) / 1e6
    return level


async def run_mixed_level(
    port: int, http_port: int, request: rerank_pb2.RerankRequest, callers: int, seconds: float
) -> list[Level]:
    """Half the callers over gRPC, half over HTTP, at once, into the one queue they share."""
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as client,
    ):
        calls = {
            "grpc": [grpc_call(rerank_pb2_grpc.RerankerStub(channel), itertools.repeat(request), [])]
            * (callers // 2),
            "http": [http_call(client, request)] * (callers - callers // 2),
        }
        return await closed_loop(calls, len(request.documents), seconds)


async def run_models_level(
    port: int, requests: dict[str, rerank_pb2.RerankRequest], callers: int, seconds: float
) -> list[Level]:
    """``callers`` callers for each of ``requests``' models at once; a Level per model."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rerank_pb2_grpc.RerankerStub(channel)
        calls = {
            model: [grpc_call(stub, itertools.repeat(request), [])] * callers
            for model, request in requests.items()
        }
        documents = len(next(iter(requests.values())).documents)
        return await closed_loop(calls, documents, seconds)


def two_models(
    model_dir: Path, request: rerank_pb2.RerankRequest, settings: dict, args: argparse.Namespace
) -> None:
    """Each model alone, then both at once: what each keeps of its throughput when they share the workers."""
    deeper = build_deeper_model(OUT / "minilm-l6-deepened-to-12-cross-encoder", model_dir, layers=12)
    requests = {}
    for name in ("fast", "slow"):
        requests[name] = rerank_pb2.RerankRequest()
        requests[name].CopyFrom(request)
        requests[name].model = name
    models = f"fast={model_dir},slow={deeper}"
    rows = []
    with start_sidecar(model_dir, {**settings, "model": models}) as sidecar:
        for name in requests:  # warm-up, not reported
            asyncio.run(run_models_level(sidecar.port, {name: requests[name]}, 1, 3.0))
        for callers in args.levels:
            alone = {
                name: asyncio.run(
                    run_models_level(sidecar.port, {name: requests[name]}, callers, args.seconds)
                )[0]
                for name in requests
            }
            together = asyncio.run(run_models_level(sidecar.port, requests, callers, args.seconds))
            for level in together:
                solo = alone[level.transport]
                rows.append(
                    {
                        "callers_per_model": callers,
                        "model": level.transport,
                        "alone": asdict(solo),
                        "together": asdict(level),
                        "kept": level.pairs_per_s / solo.pairs_per_s if solo.pairs_per_s else 0.0,
                    }
                )
    print(f"sidecar {sidecar.engine}, {args.seconds:.0f} s per run")
    columns = ("callers per model", "model", "pairs/s alone", "pairs/s together", "kept", "p50 together (s)")
    print("| " + " | ".join((*columns, "answers per caller (fewest-most)")) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for row in rows:
        together = row["together"]
        print(
            f"| {row['callers_per_model']} | {row['model']} | {row['alone']['pairs_per_s']:.1f} "
            f"| {together['pairs_per_s']:.1f} | {row['kept']:.2f}x | {together['p50_ms'] / 1000:.2f} "
            f"| {together['fewest_per_caller']}-{together['most_per_caller']} |"
        )
    record = {"hardware": hardware_record(), "engine": sidecar.engine, "settings": settings, "rows": rows}
    args.out.with_name("load-two-models.json").write_text(json.dumps(record, indent=2))


def varied_requests(
    request: rerank_pb2.RerankRequest, texts: list[str], seed: int = 0
) -> Iterator[rerank_pb2.RerankRequest]:
    """Requests like ``request`` (as many documents, the same max_length) that vary as production
    traffic does: each has its own query and SciFact passages cut to between 5 and 250 words, so the
    model's batches come in ever new shapes (rows by longest pair) and the score cache answers none."""
    rng = random.Random(seed)
    for number in itertools.count():
        documents = []
        for index, text in enumerate(rng.sample(texts, len(request.documents))):
            words = text.split()
            documents.append(rerank_pb2.Document(id=str(index), text=" ".join(words[: rng.randint(5, 250)])))
        yield rerank_pb2.RerankRequest(
            query=f"{request.query} ({number})", documents=documents, max_length=request.max_length
        )


async def soak(
    sidecar: Sidecar,
    request: rerank_pb2.RerankRequest,
    callers: int,
    seconds: float,
    requests: Iterator[rerank_pb2.RerankRequest] | None = None,
) -> dict:
    """Saturate the sidecar for ``seconds`` in one closed loop of ``request`` (or of ``requests``),
    sampling its resident memory every 10 s.

    Memory is compared from the first sample, taken after a warm-up minute at the same load.
    """
    await run_level(sidecar, request, callers, min(60.0, seconds / 5), requests)
    samples: list[tuple[float, int]] = []
    started = time.monotonic()

    async def sample() -> None:
        while True:
            samples.append((time.monotonic() - started, sidecar.rss_bytes()))
            await asyncio.sleep(10.0)

    sampler = asyncio.create_task(sample())
    level = await run_level(sidecar, request, callers, seconds, requests)
    sampler.cancel()
    samples.append((time.monotonic() - started, sidecar.rss_bytes()))
    first, last = samples[0][1], samples[-1][1]
    return {
        "callers": callers,
        "seconds": seconds,
        "rss_start_mib": first / 2**20,
        "rss_end_mib": last / 2**20,
        "rss_max_mib": max(rss for _, rss in samples) / 2**20,
        "rss_growth_percent": 100 * (last - first) / first,
        "ok": level.ok,
        "refused": level.refused,
        "errors": level.errors,
        "pairs_per_s": level.pairs_per_s,
        "p99_s": level.p99_ms / 1000,
        "rss_samples": samples,
    }


@dataclass
class CacheRun:
    """One workload of the score cache benchmark, on one sidecar."""

    workload: str
    cache: str  # "on" or "off"
    seconds: float
    requests: int = 0
    pairs: int = 0
    cached_pairs: int = 0
    hit_rate: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    server_total_p50_ms: float = 0.0


def pagination_pages(texts: list[str], page: int) -> Iterator[list[str]]:
    """The same query's next ``page`` passages, each page starting half a page after the last."""
    for start in itertools.count(0, page // 2):
        yield [texts[(start + offset) % len(texts)] for offset in range(page)]


async def run_cached_workload(
    port: int, workload: str, cache: str, pages: Iterator[list[str]], max_length: int, seconds: float
) -> CacheRun:
    """One caller, one request after the other, each the next of ``pages``, for ``seconds``."""
    run = CacheRun(workload, cache, seconds)
    latencies: list[float] = []
    server_totals: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rerank_pb2_grpc.RerankerStub(channel)
        stop_at = time.monotonic() + seconds
        while time.monotonic() < stop_at:
            documents = [rerank_pb2.Document(id=str(i), text=text) for i, text in enumerate(next(pages))]
            request = rerank_pb2.RerankRequest(query=QUERY, documents=documents, max_length=max_length)
            started = time.monotonic()
            response = await stub.Rerank(request, timeout=600)
            latencies.append(time.monotonic() - started)
            server_totals.append(response.usage.total_ns / 1e6)
            run.pairs += response.usage.pairs
            run.cached_pairs += response.usage.cached_pairs
    run.requests = len(latencies)
    run.hit_rate = run.cached_pairs / max(1, run.pairs)
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    run.p50_ms, run.p99_ms = float(p50), float(p99)
    run.server_total_p50_ms = float(np.median(server_totals))
    return run


def cache_bytes_per_pair(pairs: int = 250_000) -> float:
    """Python heap bytes one entry of a full score cache of ``pairs`` takes (key, score and LRU links)."""
    import hashlib
    import tracemalloc

    from sidecar.serving.score_cache import ScoreCache

    cache = ScoreCache(pairs)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for index in range(pairs):
        key = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=16).digest()
        cache.put([key], [index / pairs])
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return held / len(cache)


def score_cache_benchmark(model_dir: Path, settings: dict[str, str], args: argparse.Namespace) -> None:
    repeated = candidates(model_dir)
    texts, page = corpus_texts() or repeated, len(repeated)
    runs: list[CacheRun] = []
    load_average = [Path("/proc/loadavg").read_text().split()[0]]
    for cache in ("on", "off"):
        size = str(args.score_cache_size) if cache == "on" else "0"
        with start_sidecar(model_dir, {**settings, "score-cache-size": size}) as sidecar:
            engine = sidecar.engine
            warm_up = itertools.repeat(texts[-page:])  # not reported
            asyncio.run(run_cached_workload(sidecar.port, "warm-up", cache, warm_up, args.max_length, 1.0))
            workloads = {
                "pagination": pagination_pages(texts, page),
                "repeated": itertools.repeat(repeated),
            }
            for workload, pages in workloads.items():
                runs.append(
                    asyncio.run(
                        run_cached_workload(
                            sidecar.port, workload, cache, pages, args.max_length, args.cache_seconds
                        )
                    )
                )
        load_average.append(Path("/proc/loadavg").read_text().split()[0])
    bytes_per_pair = cache_bytes_per_pair()
    print(
        f"sidecar {engine}, one caller, {page} candidates a request, {args.cache_seconds:.0f} s per run; "
        f"load average (1 min) {' -> '.join(load_average)}; a cached pair takes {bytes_per_pair:.0f} bytes"
    )
    print("| workload | cache | requests | hit rate | p50 (ms) | p99 (ms) | server total p50 (ms) |")
    print("|---|---|---|---|---|---|---|")
    for run in sorted(runs, key=lambda run: (run.workload, run.cache)):
        print(
            f"| {run.workload} | {run.cache} | {run.requests} | {100 * run.hit_rate:.0f}% | {run.p50_ms:.1f} "
            f"| {run.p99_ms:.1f} | {run.server_total_p50_ms:.1f} |"
        )
    record = {
        "hardware": hardware_record(),
        "engine": engine,
        "settings": settings,
        "score_cache_size": args.score_cache_size,
        "candidates_per_request": page,
        "load_average_1min": load_average,
        "cache_bytes_per_pair": bytes_per_pair,
        "runs": [asdict(run) for run in runs],
    }
    args.out.with_name("load-score-cache.json").write_text(json.dumps(record, indent=2))


def plot(levels: list[Level], engine: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    callers = [str(level.callers) for level in levels]
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    throughput.bar(callers, [level.pairs_per_s for level in levels], color="#4c72b0")
    throughput.axhline(levels[0].pairs_per_s * 0.95, color="#c44e52", linestyle="--", label="95% of 1 caller")
    throughput.set(title=f"Throughput ({engine})", xlabel="concurrent callers", ylabel="pairs / s")
    throughput.legend()
    for name, key in (("p50", "p50_ms"), ("p95", "p95_ms"), ("p99", "p99_ms")):
        latency.plot(callers, [getattr(level, key) / 1000 for level in levels], marker="o", label=name)
    latency.set(title="Latency of a 100-candidate request", xlabel="concurrent callers", ylabel="seconds")
    latency.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=60.0, help="duration of each level")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", default="2")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-queued-pairs", default="2048")
    parser.add_argument(
        "--embed-model", default="", help="embedding model the sidecar serves too; empty serves none"
    )
    parser.add_argument("--soak-seconds", type=float, default=0.0, help="run a soak instead of the levels")
    parser.add_argument("--soak-callers", type=int, default=16)
    parser.add_argument(
        "--soak-workload",
        choices=("fixed", "varied"),
        default="fixed",
        help="the soak's requests: the levels' request over and over, or requests that vary as "
        "production traffic does (other passages, cut to other lengths: ever new batch shapes)",
    )
    parser.add_argument(
        "--mixed", action="store_true", help="half the callers over HTTP (POST /v2/rerank), half over gRPC"
    )
    parser.add_argument(
        "--two-models", action="store_true", help="a fast and a slow model, alone and then at once"
    )
    parser.add_argument(
        "--score-cache", action="store_true", help="the score cache's workloads on and off, not the levels"
    )
    parser.add_argument("--cache-seconds", type=float, default=15.0, help="duration of each cache run")
    parser.add_argument("--score-cache-size", type=int, default=250_000, help="the cache's size when on")
    parser.add_argument("--out", type=Path, default=OUT / "load.json")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(OUT / "minilm-l6-cross-encoder")
    texts = candidates(model_dir)
    request = rerank_pb2.RerankRequest(
        query=QUERY,
        documents=[rerank_pb2.Document(id=str(i), text=text) for i, text in enumerate(texts)],
        max_length=args.max_length,
    )
    settings = {
        "engine": args.engine,
        "precision": args.precision,
        "threads": args.threads,
        "max-queued-pairs": args.max_queued_pairs,
        "embed-model": args.embed_model,
        "metrics-port": str(free_port()),
    }
    if args.two_models:
        two_models(model_dir, request, settings, args)
        return
    if args.score_cache:
        score_cache_benchmark(model_dir, settings, args)
        return
    if args.mixed:
        http_port = free_port()
        with start_sidecar(model_dir, {**settings, "http-port": str(http_port)}) as sidecar:
            asyncio.run(run_mixed_level(sidecar.port, http_port, request, 2, 5.0))  # warm-up, not reported
            mixed = [
                level
                for callers in args.levels
                for level in asyncio.run(
                    run_mixed_level(sidecar.port, http_port, request, callers, args.seconds)
                )
            ]
        report_mixed(mixed, sidecar.engine, args)
        return
    with start_sidecar(model_dir, settings) as sidecar:
        asyncio.run(run_level(sidecar, request, 1, 5.0))  # warm-up, not reported
        if args.soak_seconds:
            varied = varied_requests(request, corpus_texts()) if args.soak_workload == "varied" else None
            result = asyncio.run(soak(sidecar, request, args.soak_callers, args.soak_seconds, varied))
            result["engine"], result["workload"] = sidecar.engine, args.soak_workload
            print(json.dumps({k: v for k, v in result.items() if k != "rss_samples"}, indent=2))
            record = {"hardware": hardware_record(), **result}
            name = "soak.json" if args.soak_workload == "fixed" else "soak-varied.json"
            args.out.with_name(name).write_text(json.dumps(record, indent=2))
            return
        levels = [asyncio.run(run_level(sidecar, request, n, args.seconds)) for n in args.levels]
        peak_rss_mib = sidecar.peak_rss_bytes() / 2**20
    print(
        f"sidecar {sidecar.engine}, queue limit {args.max_queued_pairs} pairs, "
        f"{args.seconds:.0f} s per level; SERVING {sidecar.start_s:.1f} s after it started, "
        f"peak RSS {peak_rss_mib:.0f} MiB"
    )
    columns = ("callers", "pairs/s", "vs 1 caller", "p50 (s)", "p95 (s)", "p99 (s)", "RESOURCE_EXHAUSTED")
    columns += ("mean queued pairs", "queue wait p50 / p99 (s)")
    print("| " + " | ".join((*columns, "other errors")) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for level in levels:
        ratio = level.pairs_per_s / levels[0].pairs_per_s if levels[0].pairs_per_s else 0.0
        print(
            f"| {level.callers} | {level.pairs_per_s:.1f} | {ratio:.2f}x | {level.p50_ms / 1000:.2f} "
            f"| {level.p95_ms / 1000:.2f} | {level.p99_ms / 1000:.2f} | {100 * level.refused_share:.0f}% "
            f"| {level.mean_queued_pairs:.0f} | {level.queue_wait_p50_ms / 1000:.2f} / "
            f"{level.queue_wait_p99_ms / 1000:.2f} | {sum(level.errors.values())} |"
        )
    record = {
        "hardware": hardware_record(),
        "engine": sidecar.engine,
        "settings": settings,
        "start_s": sidecar.start_s,
        "peak_rss_mib": peak_rss_mib,
        "levels": [asdict(x) for x in levels],
    }
    args.out.write_text(json.dumps(record, indent=2))
    plot(levels, sidecar.engine, args.out.with_suffix(".png"))


def report_mixed(levels: list[Level], engine: str, args: argparse.Namespace) -> None:
    print(f"sidecar {engine}, queue limit {args.max_queued_pairs} pairs, {args.seconds:.0f} s per level")
    columns = ("callers (gRPC+HTTP)", "transport", "pairs/s", "p50 (s)", "p95 (s)", "p99 (s)", "refused")
    print("| " + " | ".join((*columns, "answers per caller (fewest-most)", "other errors")) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for grpc_level, http_level in zip(levels[::2], levels[1::2], strict=True):
        total = f"{grpc_level.callers}+{http_level.callers}"
        for level in (grpc_level, http_level):
            print(
                f"| {total} | {level.transport} | {level.pairs_per_s:.1f} | {level.p50_ms / 1000:.2f} "
                f"| {level.p95_ms / 1000:.2f} | {level.p99_ms / 1000:.2f} | {100 * level.refused_share:.0f}% "
                f"| {level.fewest_per_caller}-{level.most_per_caller} | {sum(level.errors.values())} |"
            )
    record = {"hardware": hardware_record(), "engine": engine, "levels": [asdict(level) for level in levels]}
    args.out.with_name("load-mixed.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
