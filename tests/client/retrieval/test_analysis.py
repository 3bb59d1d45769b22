"""The embedded retriever's analysis against Elasticsearch's ``english`` analyzer, and BM25F against the
index."""

from __future__ import annotations

import math

import numpy as np
import pytest
from elasticsearch import Elasticsearch

from client.retrieval.analysis import ANALYZER, analyze
from client.retrieval.base import SearchRequest
from client.retrieval.bm25 import CombinedFieldsBM25, lucene_length
from client.retrieval.elasticsearch import ElasticsearchRetriever
from client.retrieval.embedded import EmbeddedRetriever

TEXTS = [
    "The patient's cells were running quickly; e.g. IL-6 levels of 3.5 mg/L in mice don't generalize.",
    "Studies studied studying ponies caresses relational conditional technology assembly possibly",
    "O'Neil's U.S.A. 1,000 x_y km² h₂o₂ naïve β2-adrenergic CD4+ T-cells, p<0.05 ms us",
    "It is not the vitamin D that they're taking: such is THEIR view, and there it ends.",
    # Scripts written without spaces: one token per run, as Lucene's StandardTokenizer has no dictionary.
    "ภาษาไทย ข่าววันนี้ ភាសាខ្មែរ ພາສາລາວ မြန်မာဘာသာ abcภาษา๑๒3",
    "flags 🇫🇷🇩🇪 🇫, a family 👨\u200d👩\u200d👧, thumbs 👍🏽; a token cut every 255 characters: " + "a" * 600,
]


def test_analyze_stems_drops_stop_words_and_possessives():
    assert analyze("The patient's cells were running") == ["patient", "cell", "were", "run"]
    # Porter's own departures, as Lucene has them: "logi" -> "log", "bli" -> "ble", two letters kept.
    assert analyze("technology assembly ms") == ["technolog", "assembl", "ms"]
    assert analyze("e.g. 3.5 1,000 IL-6") == ["e.g", "3.5", "1,000", "il", "6"]
    assert analyze("ภาษาไทย ข่าววันนี้") == ["ภาษาไทย", "ข่าววันนี้"]  # Thai: a token per run, not dropped


@pytest.mark.parametrize("text", TEXTS)
def test_analyze_gives_the_terms_of_the_english_analyzer(es: Elasticsearch, text: str):
    tokens = es.indices.analyze(analyzer=ANALYZER, text=text)["tokens"]
    assert analyze(text) == [token["token"] for token in tokens]


def test_lucene_length_keeps_four_significant_bits_above_24():
    lengths = np.array([0, 1, 23, 24, 31, 32, 33, 40, 41, 100, 1000])
    assert lucene_length(lengths).tolist() == [0, 1, 23, 24, 31, 32, 33, 40, 40, 96, 984]


def test_bm25_leg_gives_the_same_top_20_in_both_retrievers(
    es_exact_corpus_index: ElasticsearchRetriever, embedded_corpus_index: EmbeddedRetriever
):
    # "report 42" occurs in one title only: the title reaches BM25.
    for query in ("brain neuron memory dopamine", "cardiac report 42", "the genes of mutations"):
        request = SearchRequest(query=query, mode="bm25", size=20)
        embedded = embedded_corpus_index.leg_hits(request)["bm25"]
        elastic = es_exact_corpus_index.leg_hits(request)["bm25"]
        assert [hit.id for hit in embedded] == [hit.id for hit in elastic]
        assert [hit.score for hit in embedded] == pytest.approx([hit.score for hit in elastic], rel=1e-4)
    titled = embedded_corpus_index.leg_hits(SearchRequest(query="report 42", mode="bm25", size=1))["bm25"]
    assert titled[0].id == "doc-0042"


def test_a_title_boost_lifts_title_matches(embedded_corpus_index: EmbeddedRetriever):
    # noida-db ignores combined_fields boosts, so only the embedded retriever is checked here.
    def ranks(boost: float) -> dict[str, int]:
        request = SearchRequest(query="brain report", mode="bm25", size=240, title_boost=boost)
        return {hit.id: rank for rank, hit in enumerate(embedded_corpus_index.leg_hits(request)["bm25"])}

    plain, boosted = ranks(1.0), ranks(3.0)
    brain_titles = [f"doc-{number:04d}" for number in range(240) if number % 5 == 0]  # topic "brain"
    assert sum(boosted[doc_id] for doc_id in brain_titles) < sum(plain[doc_id] for doc_id in brain_titles)
    with pytest.raises(ValueError, match="title_boost must be at least 1"):
        SearchRequest(query="brain", mode="bm25", title_boost=0.5)


def test_combined_fields_bm25_merges_statistics_as_lucene_does():
    # "cell" is in one title and another document's text: Lucene takes the larger document frequency (1),
    # not the count of documents having it in either field (2).
    bm25 = CombinedFieldsBM25([[["cell"], ["y"]], [["x"], ["cell", "z"]]])
    idf = math.log(1 + (2 - 1 + 0.5) / (1 + 0.5))
    average = 5 / 2  # five terms over two documents

    def expected(frequency: float, length: int) -> float:
        return idf * frequency * 2.2 / (frequency + 1.2 * (0.25 + 0.75 * length / average))

    assert bm25.scores(["cell"], (1.0, 1.0)).tolist() == pytest.approx([expected(1, 2), expected(1, 3)])
    # A title boost of 2 counts a title term twice and the title's length twice (total length 7).
    average = 7 / 2
    assert bm25.scores(["cell"], (2.0, 1.0)).tolist() == pytest.approx([expected(2, 3), expected(1, 4)])
    assert bm25.scores(["unknown"], (1.0, 1.0)).tolist() == [0.0, 0.0]
