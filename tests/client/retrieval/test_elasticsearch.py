"""The Elasticsearch retriever against a real REST server: noida-db, or the cluster at ES_URL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from elasticsearch import Elasticsearch

from client.documents import Document, read_jsonl
from client.errors import ElasticsearchUnreachable, IndexMismatch, IndexNotFound
from client.ingest import ingest
from client.retrieval.base import BM25_LEG, VECTOR_LEG, Candidate, SearchRequest
from client.retrieval.elasticsearch import VECTOR_FIELD, ElasticsearchRetriever
from tests.client.conftest import FAKE_DIMS, embed_fake, fake_vector

QUERY = "brain neuron memory dopamine"


def hybrid(query: str = QUERY, **fields: object) -> SearchRequest:
    return SearchRequest(query=query, query_vector=fake_vector(query), **fields)  # type: ignore[arg-type]


def all_candidates(retriever: ElasticsearchRetriever, request: SearchRequest) -> list[Candidate]:
    return [candidate for page in retriever.candidate_pages(request) for candidate in page]


def test_index_mapping_has_text_keywords_and_an_int8_hnsw_cosine_vector(es_retriever: ElasticsearchRetriever):
    assert es_retriever.create_index(FAKE_DIMS) is True
    assert es_retriever.create_index(FAKE_DIMS) is False  # exists: left as it is
    mapping = es_retriever.client.indices.get_mapping(index=es_retriever.index)[es_retriever.index][
        "mappings"
    ]
    properties = mapping["properties"]
    for name in ("text", "title"):
        assert (properties[name]["type"], properties[name]["analyzer"]) == ("text", "english")
        assert properties[name]["fields"]["exact"]["analyzer"] == "standard"  # the original words
    vector = properties[VECTOR_FIELD]
    assert (vector["type"], vector["dims"], vector["similarity"]) == ("dense_vector", FAKE_DIMS, "cosine")
    assert vector["index_options"]["type"] == "int8_hnsw"

    list(es_retriever.index_documents([(Document("a", "x", metadata={"lang": "en"}), fake_vector("x"))]))
    mapping = es_retriever.client.indices.get_mapping(index=es_retriever.index)[es_retriever.index][
        "mappings"
    ]
    assert mapping["properties"]["metadata"]["properties"]["lang"]["type"] == "keyword"
    with pytest.raises(IndexMismatch, match=f"{FAKE_DIMS}-dimensional vectors.* gives {FAKE_DIMS + 1} dim"):
        es_retriever.create_index(FAKE_DIMS + 1)


def test_ingest_reports_each_bad_document_by_id_and_indexes_the_rest(
    es_retriever: ElasticsearchRetriever, tmp_path: Path
):
    lines = [
        {"_id": "good-1", "title": "Cells", "text": "cell membrane receptor"},
        {"_id": "no-text", "title": "Empty"},  # refused while reading
        {
            "_id": "bad-metadata",
            "text": "kinase pathway",
            "metadata": {"lang": {"nested": "object"}},
        },  # by ES
        {"_id": "good-2", "text": "neuron synapse", "metadata": {"lang": "en"}},
    ]
    source = tmp_path / "corpus.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    progressed = []

    report = ingest(read_jsonl(source), es_retriever, embed_fake, batch_size=2, on_progress=progressed.append)

    assert report.indexed == 2
    rejected = {item.id: item.reason for item in report.rejected}
    assert set(rejected) == {"no-text", "bad-metadata", "corpus.jsonl:5"}
    assert "text" in rejected["no-text"]
    assert "metadata.lang" in rejected["bad-metadata"]
    assert sum(progressed) == len(lines) + 1  # every record is accounted for
    assert es_retriever.count() == 2


def test_ingest_rerun_updates_documents_in_place(
    es_retriever: ElasticsearchRetriever, corpus: list[Document]
):
    first = ingest(corpus[:50], es_retriever, embed_fake)
    edited = [Document(d.id, d.text + " edited", d.title, d.metadata) for d in corpus[:50]]
    second = ingest(edited, es_retriever, embed_fake)

    assert (first.created_index, second.created_index) == (True, False)
    assert second.indexed == 50
    assert es_retriever.count() == 50
    source = es_retriever.client.get(index=es_retriever.index, id=corpus[0].id)["_source"]
    assert source["text"].endswith(" edited")


def test_bm25_only_ranks_by_the_match_query(es_corpus_index: ElasticsearchRetriever):
    request = SearchRequest(query=QUERY, mode="bm25", size=20)
    candidates = all_candidates(es_corpus_index, request)

    expected = es_corpus_index.client.search(
        index=es_corpus_index.index,
        query={"combined_fields": {"query": QUERY, "fields": ["title", "text"]}},
        size=20,
        source=False,
    )["hits"]["hits"]
    assert [c.id for c in candidates] == [hit["_id"] for hit in expected]
    assert all(c.vector_score is None and c.bm25_score is not None for c in candidates)
    assert [c.bm25_rank for c in candidates] == list(range(1, 21))
    assert candidates[0].document.text  # the page fetched the document itself


def test_vector_only_ranks_by_cosine(es_corpus_index: ElasticsearchRetriever, corpus: list[Document]):
    request = SearchRequest(query=QUERY, query_vector=fake_vector(QUERY), mode="vector", size=10)
    candidates = all_candidates(es_corpus_index, request)

    by_cosine = sorted(corpus, key=lambda d: -float(embed_fake([d.passage])[0] @ fake_vector(QUERY)))
    assert {c.id for c in candidates[:5]} <= {d.id for d in by_cosine[:10]}  # int8_hnsw is approximate
    assert all(c.bm25_score is None and c.vector_score is not None for c in candidates)
    scores = [c.vector_score for c in candidates]
    assert scores == sorted(scores, reverse=True)


def test_client_rrf_equals_a_fusion_computed_by_hand_from_the_legs(es_corpus_index: ElasticsearchRetriever):
    request = hybrid(size=30, rank_constant=60, bm25_weight=1.0, vector_weight=2.0)
    legs = es_corpus_index.leg_hits(request)
    candidates = all_candidates(es_corpus_index, request)

    bm25_rank = {hit.id: rank for rank, hit in enumerate(legs[BM25_LEG], start=1)}
    vector_rank = {hit.id: rank for rank, hit in enumerate(legs[VECTOR_LEG], start=1)}
    by_hand = {
        doc_id: (1.0 / (60 + bm25_rank[doc_id]) if doc_id in bm25_rank else 0.0)
        + (2.0 / (60 + vector_rank[doc_id]) if doc_id in vector_rank else 0.0)
        for doc_id in bm25_rank.keys() | vector_rank.keys()
    }
    assert len(candidates) == 30
    for candidate in candidates:
        assert candidate.fused_score == pytest.approx(by_hand[candidate.id])
        assert (candidate.bm25_rank, candidate.vector_rank) == (
            bm25_rank.get(candidate.id),
            vector_rank.get(candidate.id),
        )
    assert [c.fused_score for c in candidates] == sorted(by_hand.values(), reverse=True)[:30]
    assert sum(1 for c in candidates if c.bm25_rank and c.vector_rank) > 0  # the legs overlap: a real fusion


def test_elasticsearch_rrf_gives_the_same_top_10_as_client_rrf(es_corpus_index: ElasticsearchRetriever):
    for query in (QUERY, "gene mutation expression", "immune vaccine infection antibody"):
        client = all_candidates(es_corpus_index, hybrid(query, size=50))[:10]
        server = all_candidates(es_corpus_index, hybrid(query, size=50, fusion="elasticsearch"))[:10]

        # Equal fused scores may come in either order (each side breaks ties its own way): compare the
        # scores in order, and the ids as sets within each run of equal scores.
        assert [c.fused_score for c in server] == pytest.approx([c.fused_score for c in client], rel=1e-5)
        assert _tie_groups(server) == _tie_groups(client)
        assert all(c.bm25_score is None and c.vector_score is None for c in server)  # ES reports only fused


def _tie_groups(candidates: list[Candidate]) -> list[frozenset[str]]:
    groups: dict[float, set[str]] = {}
    for candidate in candidates:
        groups.setdefault(round(candidate.fused_score, 6), set()).add(candidate.id)
    # The last run may be cut at 10 differently on each side; compare only the complete runs.
    complete = list(groups.values())[:-1]
    return [frozenset(group) for group in complete]


def test_filters_apply_to_both_legs(es_corpus_index: ElasticsearchRetriever):
    request = hybrid(size=40, filters={"lang": "de", "year": ["2020", "2021"]})
    legs = es_corpus_index.leg_hits(request)
    candidates = all_candidates(es_corpus_index, request)

    assert legs[BM25_LEG]
    assert legs[VECTOR_LEG]
    assert candidates
    for candidate in candidates:
        assert candidate.document.metadata["lang"] == "de"
        assert candidate.document.metadata["year"] in ("2020", "2021")
    returned = {hit.id for leg in legs.values() for hit in leg}
    sources = es_corpus_index.client.mget(index=es_corpus_index.index, ids=sorted(returned))["docs"]
    assert {doc["_source"]["metadata"]["lang"] for doc in sources} == {"de"}


@pytest.mark.parametrize("fusion", ["client", "elasticsearch"])
def test_pages_yield_every_candidate_exactly_once(es_corpus_index: ElasticsearchRetriever, fusion: str):
    request = hybrid(size=70, page_size=16, fusion=fusion)
    pages = list(es_corpus_index.candidate_pages(request))

    assert [len(page) for page in pages] == [16, 16, 16, 16, 6]
    ids = [c.id for page in pages for c in page]
    assert len(ids) == len(set(ids)) == 70
    assert [c.rank for page in pages for c in page] == list(range(1, 71))
    whole = all_candidates(es_corpus_index, hybrid(size=70, page_size=70, fusion=fusion))
    assert ids == [c.id for c in whole]


def test_from_url_reaches_the_cluster(es_url: str, es: Elasticsearch, corpus: list[Document]):
    retriever = ElasticsearchRetriever.from_url(es_url, "client-test-from-url")
    try:
        ingest(corpus[:5], retriever, embed_fake)
        assert retriever.count() == 5
    finally:
        es.options(ignore_status=404).indices.delete(index="client-test-from-url")
        retriever.close()


def test_a_query_vector_of_another_dimension_is_refused_before_searching(
    es_corpus_index: ElasticsearchRetriever,
):
    request = SearchRequest(query="neuron", query_vector=np.ones(FAKE_DIMS + 3, dtype=np.float32))
    with pytest.raises(IndexMismatch, match=f"{FAKE_DIMS}-dimensional vectors.* gives {FAKE_DIMS + 3} dim"):
        es_corpus_index.candidate_pages(request)


def test_a_missing_index_and_an_unreachable_cluster_are_named(es: Elasticsearch):
    missing = ElasticsearchRetriever(es, "no-such-index")
    with pytest.raises(IndexNotFound, match=r"no index 'no-such-index'.*--es-index"):
        missing.candidate_pages(SearchRequest(query="neuron", mode="bm25"))
    with pytest.raises(IndexNotFound, match="no-such-index"):
        missing.count()
    unreachable = ElasticsearchRetriever.from_url("http://127.0.0.1:9", "documents", request_timeout=2)
    with pytest.raises(ElasticsearchUnreachable, match=r"http://127\.0\.0\.1:9 is unreachable.*--es-url"):
        unreachable.count()


def test_an_index_with_the_old_mapping_is_refused_with_a_call_to_ingest_again(
    es_retriever: ElasticsearchRetriever,
):
    # The mapping before issue 15: title and text with the standard analyzer.
    old = {
        "properties": {
            "text": {"type": "text"},
            "title": {"type": "text"},
            VECTOR_FIELD: {"type": "dense_vector", "dims": FAKE_DIMS},
        }
    }
    es_retriever.client.indices.create(index=es_retriever.index, mappings=old)
    with pytest.raises(IndexMismatch, match=r"older mapping.*'standard'.*'english'.*ingest again"):
        es_retriever.candidate_pages(SearchRequest(query="neuron", mode="bm25"))
    with pytest.raises(IndexMismatch, match="older mapping"):
        es_retriever.create_index(FAKE_DIMS)
