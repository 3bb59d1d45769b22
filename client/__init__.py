"""The thin client: hybrid retrieval (Elasticsearch or embedded) streamed into the reranking sidecar.

Imports neither torch nor transformers; it needs only the ``client`` extra.
"""

from client.documents import Document
from client.pipeline import (
    NotReranked,
    PipelineOptions,
    RerankFailed,
    SearchResponse,
    SearchResult,
    TwoStagePipeline,
)
from client.retrieval.base import Candidate, Retriever, SearchRequest
from client.retrieval.elasticsearch import ElasticsearchRetriever
from client.retrieval.embedded import EmbeddedRetriever
from client.sidecar_client import AsyncRerankClient, RerankClient

__all__ = [
    "AsyncRerankClient",
    "Candidate",
    "Document",
    "ElasticsearchRetriever",
    "EmbeddedRetriever",
    "NotReranked",
    "PipelineOptions",
    "RerankClient",
    "RerankFailed",
    "Retriever",
    "SearchRequest",
    "SearchResponse",
    "SearchResult",
    "TwoStagePipeline",
]
