"""The embedded retriever: the same answers as Elasticsearch on the same corpus, persisted to a directory."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from client.documents import Document
from client.errors import IndexMismatch, IndexNotFound, InputInvalid
from client.ingest import ingest
from client.retrieval.base import Candidate, SearchRequest
from client.retrieval.elasticsearch import ElasticsearchRetriever
from client.retrieval.embedded import EmbeddedRetriever
from tests.client.conftest import FAKE_DIMS, embed_fake, fake_vector

QUERIES = ["brain neuron memory dopamine", "gene mutation expression", "cardiac artery blood pressure"]


def top(
    retriever: ElasticsearchRetriever | EmbeddedRetriever, request: SearchRequest, n: int = 10
) -> list[Candidate]:
    return [candidate for page in retriever.candidate_pages(request) for candidate in page][:n]


@pytest.mark.parametrize("query", QUERIES)
def test_embedded_gives_the_same_fused_top_10_as_elasticsearch(
    query: str, es_exact_corpus_index: ElasticsearchRetriever, embedded_corpus_index: EmbeddedRetriever
):
    request = SearchRequest(query=query, query_vector=fake_vector(query), size=100)
    embedded = top(embedded_corpus_index, request)
    elastic = top(es_exact_corpus_index, request)

    assert [c.id for c in embedded] == [c.id for c in elastic]
    assert [c.fused_score for c in embedded] == pytest.approx([c.fused_score for c in elastic])
    # BM25 as Elasticsearch scores it, and the cosine mapped to [0, 1] as Elasticsearch maps it.
    for mine, theirs in zip(embedded, elastic, strict=True):
        assert mine.bm25_score == pytest.approx(theirs.bm25_score, rel=1e-3)
        assert mine.vector_score == pytest.approx(theirs.vector_score, abs=1e-5)


@pytest.mark.parametrize("query", QUERIES)
def test_int8_quantization_moves_only_near_ties(
    query: str, es_corpus_index: ElasticsearchRetriever, embedded_corpus_index: EmbeddedRetriever
):
    """The default int8_hnsw index scores vectors after quantizing them, so near-equal cosines can swap
    places against exact search; the BM25 leg is unaffected and the fused top 10 barely moves."""
    request = SearchRequest(query=query, query_vector=fake_vector(query), size=100)
    embedded_legs = embedded_corpus_index.leg_hits(request)
    elastic_legs = es_corpus_index.leg_hits(request)

    assert [hit.id for hit in embedded_legs["bm25"]] == [hit.id for hit in elastic_legs["bm25"]]
    overlap = {c.id for c in top(embedded_corpus_index, request)} & {
        c.id for c in top(es_corpus_index, request)
    }
    assert len(overlap) >= 8


def test_filters_and_single_legs_match_elasticsearch(
    es_exact_corpus_index: ElasticsearchRetriever, embedded_corpus_index: EmbeddedRetriever
):
    query = QUERIES[0]
    for fields in (
        {"mode": "bm25"},
        {"mode": "vector"},
        {"filters": {"lang": "de"}},
        {"filters": {"topic": ["genes", "brain"], "year": "2021"}},
    ):
        request = SearchRequest(query=query, query_vector=fake_vector(query), size=60, **fields)  # type: ignore[arg-type]
        assert [c.id for c in top(embedded_corpus_index, request)] == [
            c.id for c in top(es_exact_corpus_index, request)
        ]


def test_index_persists_and_reruns_update_in_place(tmp_path: Path, corpus: list[Document]):
    retriever = EmbeddedRetriever(tmp_path / "index")
    ingest(corpus[:30], retriever, embed_fake)
    edited = [Document(d.id, d.text + " zebra", d.title, d.metadata) for d in corpus[:10]]
    report = ingest(edited, retriever, embed_fake)

    reopened = EmbeddedRetriever(tmp_path / "index")
    assert (report.created_index, reopened.count(), reopened.dims) == (False, 30, FAKE_DIMS)
    hits = top(reopened, SearchRequest(query="zebra", mode="bm25", size=50), n=50)
    assert sorted(c.id for c in hits) == sorted(d.id for d in edited)


def test_documents_it_cannot_filter_on_are_rejected_by_id(tmp_path: Path):
    retriever = EmbeddedRetriever(tmp_path / "index")
    retriever.create_index(FAKE_DIMS)
    good = Document("good", "neuron", metadata={"tags": ["a", "b"], "year": 2020})
    bad = Document("bad", "neuron", metadata={"tags": {"nested": 1}})
    outcomes = list(retriever.index_documents([(good, fake_vector("neuron")), (bad, fake_vector("neuron"))]))

    assert [(o.id, o.error is None) for o in outcomes] == [("good", True), ("bad", False)]
    assert retriever.count() == 1
    request = SearchRequest(query="neuron", mode="bm25", filters={"year": "2020", "tags": "b"})
    assert [c.id for c in top(retriever, request)] == ["good"]
    with pytest.raises(IndexMismatch, match=f"{FAKE_DIMS}-dimensional vectors.* gives {FAKE_DIMS * 2} dim"):
        retriever.create_index(FAKE_DIMS * 2)
    [outcome] = retriever.index_documents([(Document("short", "x"), np.ones(3))])
    assert outcome.error


def test_a_missing_index_and_a_query_vector_of_another_dimension_are_refused(
    tmp_path: Path, embedded_corpus_index: EmbeddedRetriever
):
    request = SearchRequest(query="neuron", query_vector=np.ones(FAKE_DIMS + 3, dtype=np.float32))
    with pytest.raises(IndexMismatch, match=f"{FAKE_DIMS}-dimensional vectors.* gives {FAKE_DIMS + 3} dim"):
        embedded_corpus_index.candidate_pages(request)
    with pytest.raises(IndexNotFound, match=r"does not exist.*--index-dir"):
        EmbeddedRetriever(tmp_path / "missing").candidate_pages(request)
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexNotFound, match="holds no embedded index"):
        EmbeddedRetriever(tmp_path / "empty").candidate_pages(request)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_vector_that_is_not_finite_is_refused_by_id(tmp_path: Path, value: float):
    retriever = EmbeddedRetriever(tmp_path / "index")
    retriever.create_index(FAKE_DIMS)
    broken = fake_vector("neuron")
    broken[3] = value
    pairs = [(Document("good", "neuron"), fake_vector("neuron")), (Document("bad", "neuron"), broken)]
    outcomes = list(retriever.index_documents(pairs))

    assert [(o.id, o.error is None) for o in outcomes] == [("good", True), ("bad", False)]
    assert "NaN or infinite" in (outcomes[1].error or "")
    request = SearchRequest(query="neuron", query_vector=fake_vector("neuron"), mode="vector")
    assert [c.id for c in top(retriever, request)] == ["good"]


def with_vectors(documents: list[Document]) -> list[tuple[Document, np.ndarray]]:
    return [(document, fake_vector(document.passage)) for document in documents]


def test_a_search_while_another_thread_ingests_sees_all_of_the_ingest_or_none(
    tmp_path: Path, corpus: list[Document]
):
    retriever = EmbeddedRetriever(tmp_path / "index")
    ingest(corpus[:20], retriever, embed_fake)
    request = SearchRequest(query=QUERIES[0], query_vector=fake_vector(QUERIES[0]), size=100)
    seen: list[int] = []

    def searched_between_documents() -> Iterator[tuple[Document, np.ndarray]]:
        with ThreadPoolExecutor(1) as searcher:
            for pair in with_vectors(corpus[20:30]):
                yield pair
                # While the ingest is under way, a search on another thread (its error is raised here).
                seen.append(len(searcher.submit(top, retriever, request, 100).result()))

    assert all(o.error is None for o in retriever.index_documents(searched_between_documents()))
    assert seen == [20] * 10
    assert len(top(retriever, request, 100)) == 30


def test_two_ingests_at_once_lose_nothing_and_reload_consistent(tmp_path: Path, corpus: list[Document]):
    retriever = EmbeddedRetriever(tmp_path / "index")
    ingest(corpus[:20], retriever, embed_fake)

    def other_ingest_between_documents() -> Iterator[tuple[Document, np.ndarray]]:
        pairs = with_vectors(corpus[20:30])
        yield pairs[0]
        with ThreadPoolExecutor(1) as other:  # a whole ingest on another thread, in the middle of this one
            assert other.submit(ingest, corpus[30:40], retriever, embed_fake).result().indexed == 10
        yield from pairs[1:]

    list(retriever.index_documents(other_ingest_between_documents()))

    reopened = EmbeddedRetriever(tmp_path / "index")
    assert retriever.count() == reopened.count() == 40
    for document in corpus[:40]:  # every document's own vector finds it: rows and documents still line up
        request = SearchRequest(query="", query_vector=fake_vector(document.passage), mode="vector", size=40)
        best = [hit for hit in reopened.leg_hits(request)["vector"] if hit.score > 1.0 - 1e-6]
        assert document.id in {hit.id for hit in best}


@pytest.mark.parametrize("damage", ["a document line lost", "a vector lost", "a repeated id"])
def test_an_index_whose_counts_disagree_is_refused_as_damaged(
    tmp_path: Path, corpus: list[Document], damage: str
):
    directory = tmp_path / "index"
    ingest(corpus[:30], EmbeddedRetriever(directory), embed_fake)
    lines = (directory / "documents.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    if damage == "a document line lost":
        (directory / "documents.jsonl").write_text("".join(lines[:-1]), encoding="utf-8")
    elif damage == "a vector lost":
        np.save(directory / "vectors.npy", np.load(directory / "vectors.npy")[:-1])
    else:
        (directory / "documents.jsonl").write_text("".join([*lines[:-1], lines[0]]), encoding="utf-8")

    with pytest.raises(InputInvalid, match=r"damaged embedded index.*30 documents.*--index-dir") as caught:
        EmbeddedRetriever(directory)
    assert caught.value.exit_code == 4


def test_a_save_that_overlaps_another_stages_its_own_files(
    tmp_path: Path, corpus: list[Document], monkeypatch: pytest.MonkeyPatch
):
    directory = tmp_path / "index"
    ingest(corpus[:10], EmbeddedRetriever(directory), embed_fake)
    first, second = EmbeddedRetriever(directory), EmbeddedRetriever(directory)  # two processes, say
    rename = os.replace

    def rename_after_the_other_save(source: Path, destination: Path) -> None:
        monkeypatch.setattr(os, "replace", rename)
        # The other save runs whole between this save's write of a staged file and its rename.
        ingest(corpus[10:20], second, embed_fake)
        rename(source, destination)

    monkeypatch.setattr(os, "replace", rename_after_the_other_save)
    ingest(corpus[20:30], first, embed_fake)

    # The later save wins whole: its own staged files, not the other's, in place; nothing staged is left.
    assert EmbeddedRetriever(directory).count() == 20
    assert json.loads((directory / "manifest.json").read_text())["documents"] == 20
    assert sorted(path.name for path in directory.iterdir()) == [
        "documents.jsonl",
        "manifest.json",
        "vectors.npy",
    ]
