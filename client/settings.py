"""Every client setting, defined once: each field is a flag of ``rerank-client`` and an environment variable.

A flag beats its variable, which beats the default. ``python -m client.settings`` prints the README tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from client.errors import UsageError
from client.evaluation.runner import CONFIGURATIONS, DEFAULT_CONFIGURATIONS, RECALL_DEPTH
from client.retrieval.base import MAX_NUM_CANDIDATES, FilterValue
from client.retrieval.elasticsearch import VECTOR_INDEX_TYPES
from envflags import flag_name, require_non_negative, require_positive, settings_table


def _setting(default: Any, env: str, help: str, choices: Sequence[str] | None = None) -> Any:
    return field(default=default, metadata={"env": env, "help": help, "choices": choices})


def _debug_setting() -> Any:
    return _setting(
        False, "RERANK_CLIENT_DEBUG", "On a failure, print the traceback as well as the one-line error."
    )


@dataclass(frozen=True, kw_only=True)
class ClientSettings:
    es_url: str = _setting(
        "", "ES_URL", "Elasticsearch URL; empty uses the embedded retriever in --index-dir."
    )
    es_index: str = _setting("documents", "ES_INDEX", "Elasticsearch index.")
    es_api_key: str = _setting(
        "", "ES_API_KEY", "Elasticsearch API key (encoded form), if the cluster needs one."
    )
    es_ca_certs: str = _setting("", "ES_CA_CERTS", "CA bundle (PEM) that signed the cluster's certificate.")
    es_vector_index: str = _setting(
        "int8_hnsw",
        "ES_VECTOR_INDEX",
        "Vector index type of a new index (hnsw keeps float vectors: exact scores, 4x memory).",
        choices=VECTOR_INDEX_TYPES,
    )
    index_dir: str = _setting(
        "rerank-index", "RERANK_CLIENT_INDEX_DIR", "Directory of the embedded retriever (no --es-url)."
    )
    target: str = _setting(
        "localhost:50051",
        "RERANK_TARGET",
        "Sidecar address: host:port, a comma-separated list of ip:port (round_robin), or a dns: target.",
    )
    tls_root_certs: str = _setting(
        "", "RERANK_CLIENT_TLS_ROOT_CERTS", "PEM roots to verify the sidecar with; set to use TLS."
    )
    tls_client_cert: str = _setting(
        "", "RERANK_CLIENT_TLS_CLIENT_CERT", "PEM client certificate (mutual TLS)."
    )
    tls_client_key: str = _setting("", "RERANK_CLIENT_TLS_CLIENT_KEY", "PEM client key (mutual TLS).")
    token: str = _setting(
        "",
        "RERANK_CLIENT_TOKEN",
        "Bearer token for the sidecar (its --auth-token), sent over TLS or to a loopback address only. "
        "Prefer the environment variable, which other users cannot read from the process list.",
    )
    allow_insecure_token: bool = _setting(
        False,
        "RERANK_CLIENT_ALLOW_INSECURE_TOKEN",
        "Send --token over plaintext to a sidecar on another host (a trusted network only).",
    )
    timeout: float = _setting(10.0, "RERANK_CLIENT_TIMEOUT", "Deadline of each sidecar call, in seconds.")
    candidates: int = _setting(
        100, "RERANK_CLIENT_CANDIDATES", "Stage-1 candidates (N) handed to the reranker."
    )
    batch_size: int = _setting(
        32, "RERANK_CLIENT_BATCH_SIZE", "Candidates per retrieval page and per RerankStream message."
    )
    top_k: int = _setting(10, "RERANK_CLIENT_TOP_K", "Results returned after reranking.")
    mode: str = _setting(
        "hybrid", "RERANK_CLIENT_MODE", "Stage-1 legs.", choices=("hybrid", "bm25", "vector")
    )
    fusion: str = _setting(
        "client",
        "RERANK_CLIENT_FUSION",
        "Where the legs are fused: in the client (any licence, either --fusion-method), or Elasticsearch's "
        "rrf retriever.",
        choices=("client", "elasticsearch"),
    )
    fusion_method: str = _setting(
        "rrf",
        "RERANK_CLIENT_FUSION_METHOD",
        "How the client fuses the legs: reciprocal rank fusion, or a convex combination of the legs' "
        "normalized scores (--convex-weight, --normalization).",
        choices=("rrf", "convex"),
    )
    rank_constant: int = _setting(60, "RERANK_CLIENT_RANK_CONSTANT", "RRF rank constant.")
    bm25_weight: float = _setting(1.0, "RERANK_CLIENT_BM25_WEIGHT", "RRF weight of the BM25 leg.")
    vector_weight: float = _setting(1.0, "RERANK_CLIENT_VECTOR_WEIGHT", "RRF weight of the vector leg.")
    convex_weight: float = _setting(
        0.5,
        "RERANK_CLIENT_CONVEX_WEIGHT",
        "Convex fusion: weight of the vector leg's normalized score, between 0 and 1; BM25 gets 1 minus it.",
    )
    normalization: str = _setting(
        "minmax",
        "RERANK_CLIENT_NORMALIZATION",
        "Convex fusion: how each leg's scores are normalized over the hits it returned.",
        choices=("minmax", "zscore"),
    )
    title_boost: float = _setting(
        1.0,
        "RERANK_CLIENT_TITLE_BOOST",
        "Weight of the title against the text in the BM25 leg (combined_fields), at least 1.",
    )
    rerank_blend: float = _setting(
        1.0,
        "RERANK_CLIENT_RERANK_BLEND",
        "Final score = this x rerank + (1 - this) x stage-1 fused score, both min-max normalized over the "
        "candidates; 1 (the default) ranks by the reranker alone.",
    )
    num_candidates: int = _setting(
        0,
        "RERANK_CLIENT_NUM_CANDIDATES",
        f"kNN num_candidates per shard, from --candidates to {MAX_NUM_CANDIDATES} (Elasticsearch's limit); 0 "
        f"uses twice --candidates, at most {MAX_NUM_CANDIDATES}. eval raises it to the depth it searches "
        f"({RECALL_DEPTH}, or --candidates if more).",
    )
    filters: str = _setting(
        "",
        "RERANK_CLIENT_FILTERS",
        "Metadata filters on both legs: name=value[,name=value]; repeat a name for OR.",
    )
    strict: bool = _setting(
        False,
        "RERANK_CLIENT_STRICT",
        "Fail when the sidecar fails, instead of returning stage 1 not reranked.",
    )
    embed_batch_size: int = _setting(
        64, "RERANK_CLIENT_EMBED_BATCH_SIZE", "Texts per Embed call when ingesting."
    )
    format: str = _setting(
        "auto",
        "RERANK_CLIENT_FORMAT",
        "Output of search and eval: a table, one JSON document, or JSON Lines (one line per result); auto is "
        "table when stdout is a terminal, json otherwise.",
        choices=("auto", "table", "json", "jsonl"),
    )
    explain: bool = _setting(
        False,
        "RERANK_CLIENT_EXPLAIN",
        "search: say for each result why it was not reranked (a JSON field, or a table column).",
    )
    debug: bool = _debug_setting()
    log_level: str = _setting(
        "WARNING", "RERANK_CLIENT_LOG_LEVEL", "Log level.", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )

    def __post_init__(self) -> None:
        require_positive(
            self, ("timeout", "candidates", "batch_size", "top_k", "rank_constant", "embed_batch_size")
        )
        require_non_negative(self, ("bm25_weight", "vector_weight", "num_candidates"))
        for name in ("convex_weight", "rerank_blend"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{flag_name(name)} must be between 0 and 1, got {getattr(self, name)}")
        if self.num_candidates > MAX_NUM_CANDIDATES or 0 < self.num_candidates < self.candidates:
            raise ValueError(
                f"--num-candidates must be 0 (twice --candidates) or from --candidates ({self.candidates}) "
                f"to {MAX_NUM_CANDIDATES}, Elasticsearch's limit; got {self.num_candidates}"
            )
        if self.title_boost < 1.0:
            raise ValueError(
                f"--title-boost must be at least 1 (a combined_fields boost), got {self.title_boost}"
            )
        if self.fusion == "elasticsearch" and self.fusion_method != "rrf":
            raise ValueError(
                "--fusion elasticsearch runs Elasticsearch's rrf retriever: use --fusion client for "
                f"--fusion-method {self.fusion_method}"
            )
        try:
            parse_filters(self.filters)
        except ValueError as exc:
            raise UsageError(f"--filters (RERANK_CLIENT_FILTERS) {exc}") from exc

    @property
    def filter_map(self) -> dict[str, FilterValue]:
        return parse_filters(self.filters)


# `eval` keeps its own index per dataset and embedding model, always fails on a sidecar error (a ranking
# that was not reranked must not be scored as reranked), and runs every mode: these flags do not apply.
EVAL_IGNORES = frozenset({"es_index", "index_dir", "mode", "top_k", "filters", "strict", "explain"})


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """``rerank-client eval``: the settings beside the retriever and sidecar ones of ``ClientSettings``."""

    split: str = _setting("test", "RERANK_EVAL_SPLIT", "Qrels file of the BEIR dataset: qrels/SPLIT.tsv.")
    eval_dir: str = _setting(
        "rerank-eval",
        "RERANK_EVAL_DIR",
        "Where eval keeps, per dataset and embedding model, the corpus embeddings (saved batch by batch, so "
        "an interrupted run resumes) and its embedded index.",
    )
    output: str = _setting("rerank-eval.json", "RERANK_EVAL_OUTPUT", "JSON report; empty writes none.")
    plot: str = _setting("", "RERANK_EVAL_PLOT", "PNG chart of quality and latency; empty draws none.")
    max_queries: int = _setting(
        0, "RERANK_EVAL_MAX_QUERIES", "Evaluate only the first N judged queries; 0: all of them."
    )
    configs: str = _setting(
        ",".join(DEFAULT_CONFIGURATIONS),
        "RERANK_EVAL_CONFIGS",
        f"Configurations to run, comma-separated, of {', '.join(CONFIGURATIONS)}; blend is hybrid + rerank "
        "with --rerank-blend below 1.",
    )
    concurrency: int = _setting(
        1,
        "RERANK_EVAL_CONCURRENCY",
        "Queries in flight at once; above 1 the run is faster and its latencies, measured under that load, "
        "are labelled so.",
    )
    sweep: bool = _setting(
        False,
        "RERANK_EVAL_SWEEP",
        "Also report NDCG@10 and Recall@100 of hybrid stage 1 over a grid of fusion settings (RRF constant "
        "and leg weights, convex weight and normalization), from one search per leg and query. Choose "
        "settings on a training split (--split train), then report on test.",
    )

    def __post_init__(self) -> None:
        require_non_negative(self, ("max_queries",))
        require_positive(self, ("concurrency",))
        unknown = [name for name in self.configurations if name not in CONFIGURATIONS]
        if unknown or not self.configurations:
            names = ", ".join(CONFIGURATIONS)
            raise ValueError(f"--configs takes names from {names}, comma-separated; got {self.configs!r}")

    @property
    def configurations(self) -> list[str]:
        return [name.strip() for name in self.configs.split(",") if name.strip()]


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """``rerank-client demo``: the packaged contract clauses through both stages."""

    target: str = _setting(
        "",
        "RERANK_TARGET",
        "Sidecar to use (host:port), serving Embed too; empty starts one on a free 127.0.0.1 port and stops "
        "it afterwards.",
    )
    model: str = _setting(
        "sentence-transformers/all-MiniLM-L6-v2",
        "RERANK_DEMO_MODEL",
        "Reranking model of the sidecar the demo starts: the packaged embedding model (ranks by cosine), "
        "or a cross-encoder directory.",
    )
    candidates: int = _setting(20, "RERANK_DEMO_CANDIDATES", "Stage-1 candidates handed to the reranker.")
    top_k: int = _setting(3, "RERANK_DEMO_TOP_K", "Results shown per question.")
    timeout: float = _setting(30.0, "RERANK_DEMO_TIMEOUT", "Deadline of each sidecar call, in seconds.")
    startup_timeout: float = _setting(
        180.0, "RERANK_DEMO_STARTUP_TIMEOUT", "Seconds the started sidecar gets to load its models."
    )
    debug: bool = _debug_setting()

    def __post_init__(self) -> None:
        require_positive(self, ("candidates", "top_k", "timeout", "startup_timeout"))


def parse_filters(text: str) -> dict[str, FilterValue]:
    """``"lang=en,lang=de,year=2020"`` -> ``{"lang": ["en", "de"], "year": "2020"}``."""
    values: dict[str, list[str]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"takes name=value[,name=value], got {item!r}")
        values.setdefault(name.strip(), []).append(value.strip())
    return {name: found[0] if len(found) == 1 else found for name, found in values.items()}


if __name__ == "__main__":
    for title, settings_type in (("Client", ClientSettings), ("eval", EvalSettings), ("demo", DemoSettings)):
        print(f"{title} settings:\n\n{settings_table(settings_type)}\n")
