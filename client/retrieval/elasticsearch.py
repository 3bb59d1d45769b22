"""Stage 1 in Elasticsearch, through the official client only: the mapping, bulk ingest, hybrid search."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import elastic_transport
import numpy as np
from elasticsearch import (
    ApiError,
    AuthenticationException,
    AuthorizationException,
    Elasticsearch,
    NotFoundError,
    helpers,
)

from client.documents import Document
from client.errors import (
    ElasticsearchFailed,
    ElasticsearchRefused,
    ElasticsearchUnreachable,
    IndexMismatch,
    IndexNotFound,
    UsageError,
    unreadable,
)
from client.fusion import LegHit
from client.retrieval.analysis import ANALYZER
from client.retrieval.base import (
    BM25_LEG,
    VECTOR_LEG,
    Candidate,
    IndexOutcome,
    SearchRequest,
    check_query_vector,
    check_vectors,
    filter_values,
    fused_pages,
)

logger = logging.getLogger(__name__)

VECTOR_FIELD = "embedding"
DEFAULT_INDEX = "documents"


VECTOR_INDEX_TYPES = ("int8_hnsw", "hnsw", "int4_hnsw", "bbq_hnsw")


def _analyzed_text() -> dict[str, Any]:
    # `exact` keeps the original words (standard analyzer) for phrase or exact-term queries.
    return {
        "type": "text",
        "analyzer": ANALYZER,
        "fields": {"exact": {"type": "text", "analyzer": "standard"}},
    }


def index_mapping(dims: int, vector_index: str = "int8_hnsw", embedding_model: str = "") -> dict[str, Any]:
    """``text`` and ``title`` for BM25 with the ``english`` analyzer (stemmed, stop words dropped; the
    original words in the ``.exact`` subfield), every ``metadata.*`` value a keyword (filterable), and the
    vector under cosine similarity in an HNSW graph, int8-quantized by default (``hnsw`` keeps floats: exact
    scores at four times the memory). ``_meta`` records the embedding model."""
    if vector_index not in VECTOR_INDEX_TYPES:
        raise ValueError(f"vector_index must be one of {', '.join(VECTOR_INDEX_TYPES)}, got {vector_index!r}")
    return {
        "_meta": {"embedding_model": embedding_model},
        "dynamic_templates": [
            {"metadata_as_keywords": {"path_match": "metadata.*", "mapping": {"type": "keyword"}}}
        ],
        "properties": {
            "text": _analyzed_text(),
            "title": _analyzed_text(),
            "metadata": {"type": "object"},
            VECTOR_FIELD: {
                "type": "dense_vector",
                "dims": dims,
                "index": True,
                "similarity": "cosine",
                "index_options": {"type": vector_index},
            },
        },
    }


def _filter_clauses(filters: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"terms": {f"metadata.{name}": filter_values(value)}} for name, value in filters.items()]


def bm25_query(request: SearchRequest) -> dict[str, Any]:
    """BM25F over title and text: ``combined_fields`` scores them as one field (each term's frequencies and
    the lengths summed, the title's weighted by its boost), so a short title cannot outweigh the abstract the
    way ``best_fields``' per-field maximum lets it."""
    matched = {
        "combined_fields": {"query": request.query, "fields": [f"title^{request.title_boost}", "text"]}
    }
    return {"bool": {"must": [matched], "filter": _filter_clauses(request.filters)}}


def knn_clause(request: SearchRequest) -> dict[str, Any]:
    assert request.query_vector is not None  # SearchRequest checks it for every mode with a vector leg
    clause: dict[str, Any] = {
        "field": VECTOR_FIELD,
        "query_vector": [float(x) for x in request.query_vector],
        "k": request.size,
        "num_candidates": request.knn_num_candidates,
    }
    if request.filters:
        clause["filter"] = _filter_clauses(request.filters)
    return clause


def rrf_retriever(request: SearchRequest) -> dict[str, Any]:
    """Elasticsearch's own ``rrf`` retriever over the same two legs (an Enterprise-licence feature)."""
    legs: list[dict[str, Any]] = [{"standard": {"query": bm25_query(request)}}, {"knn": knn_clause(request)}]
    weights = (request.bm25_weight, request.vector_weight)
    if weights != (1.0, 1.0):
        # Weighted RRF exists from Elasticsearch 9.2; earlier versions reject the wrapped form.
        legs = [{"retriever": leg, "weight": weight} for leg, weight in zip(legs, weights, strict=True)]
    return {
        "rrf": {"retrievers": legs, "rank_constant": request.rank_constant, "rank_window_size": request.size}
    }


def _document(doc_id: str, source: Mapping[str, Any]) -> Document:
    return Document(
        id=doc_id,
        text=source.get("text", ""),
        title=source.get("title") or "",
        metadata=source.get("metadata") or {},
    )


def _error_reason(item: Mapping[str, Any]) -> str:
    error = item.get("error")
    if isinstance(error, Mapping):
        return f"{error.get('type', 'error')}: {error.get('reason', '')}".strip()
    return str(error or item)


class ElasticsearchRetriever:
    """Hybrid BM25 + kNN retrieval in one Elasticsearch index. Fusion runs in the client by default (every
    licence tier), or in Elasticsearch with ``fusion="elasticsearch"``."""

    def __init__(
        self,
        client: Elasticsearch,
        index: str = DEFAULT_INDEX,
        *,
        vector_index: str = "int8_hnsw",
        bulk_chunk_size: int = 256,
    ) -> None:
        self.client = client
        self.index = index
        self.vector_index = vector_index
        self.bulk_chunk_size = bulk_chunk_size
        self.url = ", ".join(node.base_url for node in client.transport.node_pool.all())
        self._vectors: tuple[int | None, str] | None = None  # dims and model, once a search looked them up

    @classmethod
    def from_url(
        cls,
        url: str,
        index: str = DEFAULT_INDEX,
        *,
        api_key: str | None = None,
        ca_certs: str | None = None,
        request_timeout: float = 30.0,
        vector_index: str = "int8_hnsw",
    ) -> ElasticsearchRetriever:
        if ca_certs:
            try:
                Path(ca_certs).read_bytes()  # fail here, naming the file, not at the first request
            except OSError as exc:
                raise unreadable(Path(ca_certs), "the CA bundle (--es-ca-certs)", exc) from exc
        try:
            client = Elasticsearch(
                url, api_key=api_key or None, ca_certs=ca_certs or None, request_timeout=request_timeout
            )
        except ValueError as exc:
            raise UsageError(f"--es-url {url!r} cannot be used ({exc})") from exc
        return cls(client, index, vector_index=vector_index)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """The official client's exceptions become ``ClientError``s naming the cluster and the index."""
        where = f"Elasticsearch at {self.url}"
        try:
            yield
        except elastic_transport.ConnectionError as exc:
            raise ElasticsearchUnreachable(
                f"{where} is unreachable ({exc.message}): start it, or set --es-url (ES_URL) to where it runs"
            ) from exc
        except elastic_transport.ConnectionTimeout as exc:
            raise ElasticsearchUnreachable(
                f"{where} did not answer in time ({exc.message}): check that it is up and not overloaded"
            ) from exc
        except (AuthenticationException, AuthorizationException) as exc:
            refusal = "refused the credentials" if exc.status_code == 401 else "denied the request"
            raise ElasticsearchRefused(
                f"{where} {refusal} on index {self.index!r} ({exc.status_code} {exc.error}): set "
                "--es-api-key (ES_API_KEY) to an API key allowed to read and write that index"
            ) from exc
        except NotFoundError as exc:  # every call here names an index, so a 404 means that index is missing
            raise IndexNotFound(
                f"{where} has no index {self.index!r} ({exc.error}): ingest documents into it first "
                f"(rerank-client ingest FILE --es-index {self.index}), or set --es-index to an existing index"
            ) from exc
        except ApiError as exc:
            raise ElasticsearchFailed(f"{where} refused a request on index {self.index!r}: {exc}") from exc

    def _index_vectors(self) -> tuple[int | None, str]:
        """The dimension (None: no vectors) and embedding model ("": not recorded) of the index's vectors;
        IndexNotFound when there is no index, IndexMismatch when its text is not analyzed as this client's."""
        mappings = self.client.indices.get_mapping(index=self.index)
        mapping = next(iter(mappings.values()))["mappings"]  # keyed by the concrete index behind an alias
        properties = mapping.get("properties", {})
        analyzers = {name: properties.get(name, {}).get("analyzer", "standard") for name in ("title", "text")}
        if any(analyzer != ANALYZER for analyzer in analyzers.values()):
            raise IndexMismatch(
                f"Elasticsearch index {self.index!r} was built with an older mapping (title and text "
                f"analyzed by {analyzers['title']!r} and {analyzers['text']!r}, not {ANALYZER!r}), so BM25 "
                "would miss stemmed matches and titles: delete it and ingest again, or ingest into a new "
                "--es-index"
            )
        dims = mapping.get("properties", {}).get(VECTOR_FIELD, {}).get("dims")
        model = mapping.get("_meta", {}).get("embedding_model", "")
        return (None if dims is None else int(dims)), str(model)

    def create_index(self, dims: int, embedding_model: str = "") -> bool:
        with self._errors():
            if self.client.indices.exists(index=self.index):
                index_dims, index_model = self._index_vectors()
                index = f"Elasticsearch index {self.index!r}"
                check_vectors(index, index_dims, index_model, dims, embedding_model)
                return False
            mapping = index_mapping(dims, self.vector_index, embedding_model)
            self.client.indices.create(index=self.index, mappings=mapping)
            return True

    def index_documents(self, documents: Iterable[tuple[Document, np.ndarray]]) -> Iterator[IndexOutcome]:
        actions = (
            {
                "_op_type": "index",  # replaces a document with the same id: reruns update, never duplicate
                "_index": self.index,
                "_id": document.id,
                "_source": {
                    "text": document.text,
                    "title": document.title,
                    "metadata": dict(document.metadata),
                    VECTOR_FIELD: [float(x) for x in vector],
                },
            }
            for document, vector in documents
        )
        with self._errors():
            for ok, item in helpers.streaming_bulk(
                self.client,
                actions,
                chunk_size=self.bulk_chunk_size,
                max_retries=3,  # 429s, with the helper's exponential backoff
                raise_on_error=False,
                raise_on_exception=False,  # a failed chunk reports each of its documents instead of stopping
            ):
                result = next(iter(item.values()))
                yield IndexOutcome(str(result.get("_id")), None if ok else _error_reason(result))
            self.client.indices.refresh(index=self.index)

    def count(self) -> int:
        with self._errors():
            return int(self.client.count(index=self.index)["count"])

    def candidate_pages(self, request: SearchRequest) -> Iterator[list[Candidate]]:
        if self._vectors is None:
            with self._errors():
                self._vectors = self._index_vectors()
        check_query_vector(request, f"Elasticsearch index {self.index!r}", *self._vectors)
        if request.fusion == "elasticsearch":
            return self._rrf_pages(request)
        return fused_pages(
            request.fuse(self.leg_hits(request)), request.page_size, self._fetch, self._report_missing
        )

    def leg_hits(self, request: SearchRequest) -> dict[str, list[LegHit]]:
        """Each leg's ranked ids and scores (no sources), all legs in one ``msearch`` round trip."""
        bodies = {
            BM25_LEG: {"query": bm25_query(request)},
            VECTOR_LEG: {"knn": knn_clause(request)} if request.mode != "bm25" else {},
        }
        searches: list[dict[str, Any]] = []
        for leg in request.legs:
            searches += [{"index": self.index}, {**bodies[leg], "size": request.size, "_source": False}]
        with self._errors():
            responses = self.client.msearch(searches=searches)["responses"]
        legs = {}
        for leg, response in zip(request.legs, responses, strict=True):
            if "error" in response:
                raise ElasticsearchFailed(
                    f"Elasticsearch at {self.url} failed the {leg} leg's search on index {self.index!r}: "
                    f"{_error_reason(response)}"
                )
            legs[leg] = [LegHit(hit["_id"], float(hit["_score"])) for hit in response["hits"]["hits"]]
        return legs

    def _fetch(self, ids: list[str]) -> dict[str, Document]:
        if not ids:
            return {}
        with self._errors():
            response = self.client.mget(index=self.index, ids=ids, source_excludes=[VECTOR_FIELD])
        return {
            doc["_id"]: _document(doc["_id"], doc["_source"]) for doc in response["docs"] if doc.get("found")
        }

    def _report_missing(self, doc_id: str) -> None:
        logger.warning("document %s was deleted between the search and the fetch; skipped", doc_id)

    def _rrf_pages(self, request: SearchRequest) -> Iterator[list[Candidate]]:
        """Pages of the ``rrf`` retriever's fused list (``from``/``size`` within its rank window)."""
        retriever = rrf_retriever(request)
        for start in range(0, request.size, request.page_size):
            size = min(request.page_size, request.size - start)
            with self._errors():
                response = self.client.search(
                    index=self.index,
                    retriever=retriever,
                    from_=start,
                    size=size,
                    source_excludes=[VECTOR_FIELD],
                )
            hits = response["hits"]["hits"]
            yield [
                Candidate(
                    document=_document(hit["_id"], hit["_source"]),
                    rank=rank,
                    fused_score=float(hit["_score"]),
                )
                for rank, hit in enumerate(hits, start=start + 1)
            ]
            if len(hits) < size:
                return

    def close(self) -> None:
        self.client.close()
