"""Ingest: documents in, sidecar embeddings in batches, into a retriever; every failure reported by id."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from client.documents import Document, Rejected
from client.retrieval.base import Retriever

DEFAULT_EMBED_BATCH_SIZE = 64


@dataclass
class IngestReport:
    indexed: int = 0
    rejected: list[Rejected] = field(default_factory=list)
    created_index: bool = False


def ingest(
    records: Iterable[Document | Rejected],
    retriever: Retriever,
    embed: Callable[[Sequence[str]], np.ndarray],
    *,
    batch_size: int = DEFAULT_EMBED_BATCH_SIZE,
    embedding_model: str = "",
    on_progress: Callable[[int], None] = lambda _: None,
) -> IngestReport:
    """Embed each document's passage (``batch_size`` per call) and index it with its vector.

    Records rejected while reading, and documents the index refuses, land in the report by id; the rest are
    indexed. The index is created on the first batch, with the dimensions of the vectors the model returns and
    ``embedding_model``'s name; an index of other vectors is refused before anything is written to it.
    """
    report = IngestReport()

    def embedded() -> Iterator[tuple[Document, np.ndarray]]:
        documents = _accepted(records, report, on_progress)
        while batch := list(itertools.islice(documents, batch_size)):
            vectors = embed([document.passage for document in batch])
            if len(vectors) != len(batch):
                raise RuntimeError(f"the embedder returned {len(vectors)} vectors for {len(batch)} texts")
            yield from zip(batch, vectors, strict=True)

    pairs = embedded()
    first = next(pairs, None)
    if first is None:
        return report
    report.created_index = retriever.create_index(int(first[1].shape[0]), embedding_model)
    for outcome in retriever.index_documents(itertools.chain([first], pairs)):
        if outcome.error is None:
            report.indexed += 1
        else:
            report.rejected.append(Rejected(outcome.id, outcome.error))
        on_progress(1)
    return report


def _accepted(
    records: Iterable[Document | Rejected], report: IngestReport, on_progress: Callable[[int], None]
) -> Iterator[Document]:
    for record in records:
        if isinstance(record, Rejected):
            report.rejected.append(record)
            on_progress(1)
        else:
            yield record
