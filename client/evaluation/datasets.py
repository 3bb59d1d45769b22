"""BEIR datasets for ``rerank-client eval``: the judged queries and qrels of a split, and the corpus indexed
once per dataset and embedding model."""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.documents import Document, Rejected, read_documents, read_jsonl
from client.embedding_cache import EmbeddingCache
from client.errors import InputInvalid, InputMissing, unreadable
from client.ingest import IngestReport, ingest
from client.retrieval.base import Retriever
from rerank.v1 import rerank_pb2


@dataclass(frozen=True)
class BeirDataset:
    directory: Path
    queries: dict[str, str]  # the judged queries of the split, in queries.jsonl order
    qrels: dict[str, dict[str, int]]  # query id -> document id -> relevance
    fingerprint: str  # of corpus.jsonl: an edited corpus gets new embeddings and a new index

    @property
    def name(self) -> str:
        return self.directory.resolve().name


def load_beir(directory: Path, split: str = "test") -> BeirDataset:
    """The queries and qrels of one split of a BEIR-layout directory (its corpus is read when ingesting)."""
    if not directory.exists():
        raise InputMissing(f"{directory} does not exist: give a BEIR dataset directory")
    layout = "a BEIR dataset directory holds corpus.jsonl, queries.jsonl and qrels/SPLIT.tsv"
    if not directory.is_dir():
        raise InputInvalid(f"{directory} is a file, not a dataset: {layout}")
    corpus, queries_path, qrels_path = (
        directory / "corpus.jsonl",
        directory / "queries.jsonl",
        directory / "qrels" / f"{split}.tsv",
    )
    for path in (corpus, queries_path):
        if not path.is_file():
            raise InputInvalid(f"{directory} is not a BEIR dataset, it has no {path.name}: {layout}")
    if not qrels_path.is_file():
        splits = sorted(path.stem for path in (directory / "qrels").glob("*.tsv"))
        raise InputInvalid(
            f"{directory} has no qrels for the split {split!r} ({qrels_path} is missing): "
            + (f"pick one of {', '.join(splits)} with --split" if splits else "add qrels/SPLIT.tsv")
        )
    qrels = _read_qrels(qrels_path)
    queries = {}
    for record in read_jsonl(queries_path):
        if isinstance(record, Rejected):
            raise InputInvalid(f"{queries_path}: {record.id}: {record.reason}")
        if record.id in qrels:
            queries[record.id] = record.text
    if unknown := sorted(set(qrels) - set(queries)):
        raise InputInvalid(
            f"{qrels_path} judges queries missing from queries.jsonl: {', '.join(unknown[:5])}"
        )
    return BeirDataset(directory, queries, qrels, _file_digest(corpus))


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """query id -> document id -> relevance, from a BEIR qrels TSV (header: query-id, corpus-id, score)."""
    qrels: dict[str, dict[str, int]] = {}
    try:
        with path.open(encoding="utf-8", newline="") as rows:
            reader = csv.DictReader(rows, delimiter="\t")
            try:
                for row in reader:
                    qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
            except (KeyError, ValueError, TypeError) as exc:
                raise InputInvalid(
                    f"{path}:{reader.line_num} is not a qrels row ({exc!r}): qrels are tab-separated, with "
                    "the header query-id, corpus-id, score, and integer scores"
                ) from exc
    except OSError as exc:
        raise unreadable(path, "the qrels file", exc) from exc
    if not qrels:
        raise InputInvalid(f"{path} judges no query: add rows of query-id, corpus-id, score")
    return qrels


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while chunk := data.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def workspace_name(dataset: BeirDataset, embedding_model: rerank_pb2.EmbeddingModelInfo) -> str:
    """``scifact-<corpus digest>-<model>-<precision>``: lowercase, so it also serves as an Elasticsearch index
    name. The precision is part of the key: vectors computed at another precision differ slightly."""
    model = re.sub(r"[^a-z0-9]+", "-", f"{embedding_model.model_id}-{embedding_model.precision}".lower())
    model = model.strip("-")
    name = re.sub(r"[^a-z0-9]+", "-", dataset.name.lower()).strip("-")
    return f"{name}-{dataset.fingerprint[:12]}-{model}"


def prepare_index(
    dataset: BeirDataset,
    retriever: Retriever,
    embed: Callable[[Sequence[str]], np.ndarray],
    cache: EmbeddingCache,
    *,
    dims: int,
    embedding_model: str = "",
    batch_size: int,
    on_embedded: Callable[[int], None] = lambda _: None,
    on_indexed: Callable[[int], None] = lambda _: None,
) -> IngestReport | None:
    """Index the corpus unless the index already holds all of it (None then).

    Embeddings come from ``cache`` where it has them; the others are computed and saved there batch by
    batch, so a run interrupted while embedding resumes where it stopped.
    """
    records = list(read_documents(dataset.directory))
    documents = sum(isinstance(record, Document) for record in records)
    retriever.create_index(dims, embedding_model)
    if retriever.count() == documents:
        return None

    def embed_cached(texts: Sequence[str]) -> np.ndarray:
        vectors = cache.embed(texts, embed)
        on_embedded(len(texts))
        return vectors

    return ingest(
        records,
        retriever,
        embed_cached,
        batch_size=batch_size,
        embedding_model=embedding_model,
        on_progress=on_indexed,
    )
