"""What the server says about itself: the models, their engines, how those were chosen, the limits.

Plain values, so each transport renders them its own way (a protobuf message, JSON).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SelectionInfo:
    """How the engine chain chose, and on what hardware."""

    from_cache: bool
    lossy_margin: float
    speedup_over_lossless: float
    timings: dict[str, float]  # candidate ("engine/precision") -> rows per second
    hardware: str


@dataclass(frozen=True)
class ScoreCacheInfo:
    """The model's exact score cache: whether it answers now, its size, and why not when it does not."""

    serves: bool
    max_pairs: int
    pairs: int
    why_not_serving: str


@dataclass(frozen=True)
class RankingInfo:
    model_id: str
    model_revision: str
    model_kind: str
    engine: str
    precision: str
    device: str
    max_length: int
    num_labels: int  # 0 for a bi-encoder
    max_batch_tokens: int
    batch_workers: int
    max_batch_pairs: int
    max_queued_pairs: int
    max_documents_per_request: int
    max_chunks_per_doc: int
    engine_notes: tuple[str, ...]
    compiled: bool
    selection: SelectionInfo
    model_family: str
    instruction: str  # what a decoder reranker is told when a request brings none; empty for encoders
    score_cache: ScoreCacheInfo


@dataclass(frozen=True)
class EmbeddingInfo:
    model_id: str
    dims: int
    pooling: str
    normalized: bool
    max_length: int
    engine: str
    precision: str
    device: str
    compiled: bool
    selection: SelectionInfo


@dataclass(frozen=True)
class ModelInfo:
    """One model as a request's ``model`` chooses it, for one service."""

    name: str
    service: str  # "rerank" or "embed"
    default: bool  # what a request that names no model gets
    model_id: str
    model_kind: str
    model_family: str
    engine: str
    precision: str
    device: str
    compiled: bool
    max_length: int
    max_batch_tokens: int
    max_batch_pairs: int
    batch_workers: int
    score_cache: ScoreCacheInfo | None  # a reranker's; None for an embedder
    # An embedder's vectors: width, pooling and whether normalized (0, "" and False for a reranker).
    dims: int
    pooling: str
    normalized: bool


@dataclass(frozen=True)
class ServingInfo:
    # The default reranker and embedder; ``models`` lists every model of both services.
    ranking: RankingInfo
    embedding: EmbeddingInfo | None
    server_version: str
    models: tuple[ModelInfo, ...]
    tokenize_in: str  # "threads" or "processes", for every model
    tokenizer_workers: int
