"""The thin client: hybrid retrieval (Elasticsearch or embedded) streamed into the reranking sidecar.

Imports neither torch nor transformers; it needs only the ``client`` extra. The names below load on first use,
so that ``rerank-client`` can set gRPC's log level before anything imports grpc (``client.__main__``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_MODULE_OF = {
    "AsyncRerankClient": "client.sidecar_client",
    "Candidate": "client.retrieval.base",
    "Document": "client.documents",
    "ElasticsearchRetriever": "client.retrieval.elasticsearch",
    "EmbeddedRetriever": "client.retrieval.embedded",
    "NotReranked": "client.pipeline",
    "PipelineOptions": "client.pipeline",
    "RerankClient": "client.sidecar_client",
    "RerankFailed": "client.pipeline",
    "Retriever": "client.retrieval.base",
    "SearchRequest": "client.retrieval.base",
    "SearchResponse": "client.pipeline",
    "SearchResult": "client.pipeline",
    "TwoStagePipeline": "client.pipeline",
}
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


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
