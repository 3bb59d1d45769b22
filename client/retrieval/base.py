"""The retriever interface, the search request, and the candidates both retrievers hand on page by page."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from client.documents import Document
from client.errors import IndexMismatch
from client.fusion import (
    DEFAULT_RANK_CONSTANT,
    FusedHit,
    LegHit,
    Normalization,
    convex_fusion,
    reciprocal_rank_fusion,
)

Mode = Literal["hybrid", "bm25", "vector"]
Fusion = Literal["client", "elasticsearch"]
FusionMethod = Literal["rrf", "convex"]
FilterValue = str | Sequence[str]

BM25_LEG = "bm25"
VECTOR_LEG = "vector"
MAX_NUM_CANDIDATES = 10_000  # Elasticsearch refuses a kNN num_candidates above it


@dataclass(frozen=True)
class SearchRequest:
    """One stage-1 search. ``filters`` map a metadata field to a value (or any of several values) and apply
    to both legs."""

    query: str
    query_vector: np.ndarray | None = None  # L2-normalized; required unless mode is "bm25"
    mode: Mode = "hybrid"
    size: int = 100  # candidates in the fused list (N)
    page_size: int = 32
    filters: Mapping[str, FilterValue] = field(default_factory=dict)
    fusion: Fusion = "client"
    fusion_method: FusionMethod = "rrf"
    rank_constant: int = DEFAULT_RANK_CONSTANT
    bm25_weight: float = 1.0  # RRF leg weights
    vector_weight: float = 1.0
    convex_weight: float = 0.5  # convex fusion: the vector leg's weight; BM25's is 1 minus it
    normalization: Normalization = "minmax"  # of each leg's scores, for convex fusion
    title_boost: float = 1.0  # of title against text in the BM25 leg's combined_fields (at least 1)
    num_candidates: int = 0  # per-shard HNSW candidates of the kNN leg; 0: ``knn_num_candidates``
    embedding_model: str = ""  # the model that made ``query_vector``; refused by an index built with another

    def __post_init__(self) -> None:
        if self.size < 1 or self.page_size < 1:
            raise ValueError(f"size and page_size must be positive, got {self.size} and {self.page_size}")
        if self.mode != "bm25" and self.query_vector is None:
            raise ValueError(f"mode {self.mode!r} needs a query vector")
        if self.fusion == "elasticsearch" and self.mode != "hybrid":
            raise ValueError("fusion='elasticsearch' fuses two legs: it needs mode 'hybrid'")
        if self.fusion == "elasticsearch" and self.fusion_method != "rrf":
            raise ValueError(
                "fusion='elasticsearch' runs Elasticsearch's rrf retriever: it needs fusion_method 'rrf'"
            )
        if not 0.0 <= self.convex_weight <= 1.0:
            raise ValueError(f"convex_weight must be between 0 and 1, got {self.convex_weight}")
        if self.title_boost < 1.0:
            raise ValueError(
                f"title_boost must be at least 1 (combined_fields boosts), got {self.title_boost}"
            )
        if self.num_candidates and self.num_candidates < self.size:
            raise ValueError(f"num_candidates ({self.num_candidates}) must be at least size ({self.size})")

    @property
    def legs(self) -> tuple[str, ...]:
        return {"hybrid": (BM25_LEG, VECTOR_LEG), "bm25": (BM25_LEG,), "vector": (VECTOR_LEG,)}[self.mode]

    @property
    def weights(self) -> dict[str, float]:
        return {BM25_LEG: self.bm25_weight, VECTOR_LEG: self.vector_weight}

    @property
    def knn_num_candidates(self) -> int:
        """``num_candidates``, or twice ``size`` capped at Elasticsearch's maximum (but never below ``size``,
        which Elasticsearch requires and refuses past that maximum itself)."""
        return self.num_candidates or max(self.size, min(2 * self.size, MAX_NUM_CANDIDATES))

    def fuse(self, legs: Mapping[str, Sequence[LegHit]]) -> list[FusedHit]:
        """The client-side fusion of the legs' hits, by ``fusion_method``, cut to ``size``."""
        if self.fusion_method == "convex":
            weights = {BM25_LEG: 1.0 - self.convex_weight, VECTOR_LEG: self.convex_weight}
            return convex_fusion(legs, weights=weights, normalization=self.normalization, size=self.size)
        return reciprocal_rank_fusion(
            legs, rank_constant=self.rank_constant, weights=self.weights, size=self.size
        )


@dataclass(frozen=True)
class Candidate:
    """A stage-1 result. Leg scores are None where the leg did not return the document, or where fusion ran
    inside Elasticsearch (which reports only the fused score)."""

    document: Document
    rank: int  # 1-based position in the fused list
    fused_score: float
    bm25_score: float | None = None
    bm25_rank: int | None = None
    vector_score: float | None = None  # cosine mapped to [0, 1] as Elasticsearch does: (1 + cos) / 2
    vector_rank: int | None = None

    @property
    def id(self) -> str:
        return self.document.id


@dataclass(frozen=True)
class IndexOutcome:
    id: str
    error: str | None = None  # None: indexed


class Retriever(Protocol):
    """What the pipeline and ingest need from a stage-1 store. ``ElasticsearchRetriever`` and
    ``EmbeddedRetriever`` implement it, so neither can tell them apart."""

    def create_index(self, dims: int, embedding_model: str = "") -> bool:
        """Create the index for ``dims``-dimensional vectors of ``embedding_model`` (recorded, so that vectors
        of another model are refused later); False when it exists already, for the same dims and model."""
        ...

    def index_documents(self, documents: Iterable[tuple[Document, np.ndarray]]) -> Iterator[IndexOutcome]:
        """Index or replace (by id) each document with its vector; one outcome per document."""
        ...

    def count(self) -> int: ...

    def candidate_pages(self, request: SearchRequest) -> Iterator[list[Candidate]]:
        """The fused candidates in order, ``request.page_size`` at a time, each fetched when asked for."""
        ...

    def leg_hits(self, request: SearchRequest) -> dict[str, list[LegHit]]:
        """Each leg's ranked ids and scores, ``request.size`` deep, before fusion."""
        ...

    def close(self) -> None: ...


def candidate_from(hit: FusedHit, rank: int, document: Document) -> Candidate:
    return Candidate(
        document=document,
        rank=rank,
        fused_score=hit.score,
        bm25_score=hit.leg_scores.get(BM25_LEG),
        bm25_rank=hit.leg_ranks.get(BM25_LEG),
        vector_score=hit.leg_scores.get(VECTOR_LEG),
        vector_rank=hit.leg_ranks.get(VECTOR_LEG),
    )


def fused_pages(
    fused: Sequence[FusedHit],
    page_size: int,
    fetch: Callable[[list[str]], Mapping[str, Document]],
    on_missing: Callable[[str], None],
) -> Iterator[list[Candidate]]:
    """Windows of a fused list; each window's documents are fetched only when the window is asked for."""
    for start in range(0, len(fused), page_size):
        window = fused[start : start + page_size]
        documents = fetch([hit.id for hit in window])
        page = []
        for rank, hit in enumerate(window, start=start + 1):
            if hit.id in documents:
                page.append(candidate_from(hit, rank, documents[hit.id]))
            else:
                on_missing(hit.id)  # deleted between the search and the fetch
        yield page


def filter_values(value: FilterValue) -> list[str]:
    return [value] if isinstance(value, str) else [str(item) for item in value]


def check_vectors(index: str, index_dims: int | None, index_model: str, dims: int, model: str) -> None:
    """Refuses ``dims``-dimensional vectors of ``model`` for ``index`` (which index, where) when it holds
    others. Models are compared where both are known: an index built before they were recorded names none."""
    fix = "use the embedding model the index was built with, or ingest into a new index"
    if index_dims != dims:
        holds = "no vectors" if index_dims is None else f"{index_dims}-dimensional vectors"
        raise IndexMismatch(f"{index} holds {holds}, but the embedding model gives {dims} dimensions: {fix}")
    if index_model and model and index_model != model:
        raise IndexMismatch(
            f"{index} was built with the embedding model {index_model!r}, not {model!r}: {fix}"
        )


def check_query_vector(request: SearchRequest, index: str, index_dims: int | None, index_model: str) -> None:
    """Refuses, before any search runs, a query vector that the index's vectors cannot be compared with."""
    if request.query_vector is not None:
        dims = int(request.query_vector.size)
        check_vectors(index, index_dims, index_model, dims, request.embedding_model)
