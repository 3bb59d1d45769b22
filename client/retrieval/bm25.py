"""BM25F over title and text as Elasticsearch's ``combined_fields`` query scores it (Lucene's
CombinedFieldQuery), so the embedded retriever ranks as an Elasticsearch index does.

Per query term: the boosted term frequencies of the fields are summed, as are the boosted field lengths;
document frequency is the largest of the fields'; field lengths are stored the way Lucene stores norms
(one byte, exact below 24, then four significant bits); and the score keeps the classic ``k1 + 1`` factor
that Elasticsearch keeps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import sparse

K1 = 1.2
B = 0.75
FIELDS = ("title", "text")


def lucene_length(length: np.ndarray) -> np.ndarray:
    """A field length as Lucene decodes its one-byte norm (SmallFloat.intToByte4, then byte4ToInt)."""
    length = np.asarray(length, dtype=np.int64)
    excess = np.maximum(length - 24, 0)
    shift = np.maximum(np.floor(np.log2(np.maximum(excess, 1))).astype(np.int64) - 3, 0)
    return np.where(length < 24, length, 24 + ((excess >> shift) << shift))


class CombinedFieldsBM25:
    """Term frequencies per field in sparse matrices (documents x vocabulary), scored at query time."""

    def __init__(self, fields: Sequence[Sequence[list[str]]]) -> None:
        """``fields``: per field (title, text), each document's analyzed terms."""
        self.vocabulary: dict[str, int] = {}
        for documents in fields:
            for terms in documents:
                for term in terms:
                    self.vocabulary.setdefault(term, len(self.vocabulary))
        self._frequencies = [self._term_frequencies(documents) for documents in fields]
        self._raw_lengths = [np.array([len(terms) for terms in documents]) for documents in fields]
        self._lengths = [lucene_length(raw) for raw in self._raw_lengths]

    def _term_frequencies(self, documents: Sequence[list[str]]) -> sparse.csc_matrix:
        rows = np.repeat(np.arange(len(documents)), [len(terms) for terms in documents])
        columns = np.fromiter(
            (self.vocabulary[term] for terms in documents for term in terms), dtype=np.int64, count=len(rows)
        )
        shape = (len(documents), len(self.vocabulary))
        # Duplicate (row, column) entries are summed into counts.
        return sparse.csc_matrix((np.ones(len(rows), dtype=np.float32), (rows, columns)), shape=shape)

    def scores(self, query_terms: Sequence[str], boosts: Sequence[float]) -> np.ndarray:
        """Every document's score; 0 where it shares no term with the query. A repeated query term counts
        each time, as Elasticsearch's query builder makes one clause per occurrence."""
        documents = self._raw_lengths[0].size
        scores = np.zeros(documents, dtype=np.float64)
        terms = [self.vocabulary[term] for term in query_terms if term in self.vocabulary]
        if not terms:
            return scores
        # Collection statistics merged as Lucene merges them: boosted total length over the largest count of
        # documents that have the field.
        with_field = max(int(np.count_nonzero(raw)) for raw in self._raw_lengths)
        total_length = 0  # a Java long, added to field by field
        for boost, raw in zip(boosts, self._raw_lengths, strict=True):
            total_length = int(total_length + boost * int(raw.sum()))
        average_length = total_length / with_field
        combined = sum(boost * length for boost, length in zip(boosts, self._lengths, strict=True))
        length = lucene_length(np.floor(combined + 0.5))
        normalizer = K1 * (1.0 - B + B * length / average_length)
        for term in terms:
            columns = [frequencies.getcol(term) for frequencies in self._frequencies]
            document_frequency = max(column.nnz for column in columns)
            idf = math.log(1.0 + (with_field - document_frequency + 0.5) / (document_frequency + 0.5))
            frequency = columns[0] * boosts[0]
            for boost, column in zip(boosts[1:], columns[1:], strict=True):
                frequency = frequency + column * boost
            frequency = frequency.tocoo()
            rows = frequency.row
            scores[rows] += idf * frequency.data * (K1 + 1.0) / (frequency.data + normalizer[rows])
        return scores
