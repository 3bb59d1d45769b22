"""Stage 1 in-process: BM25F over title and text, and exact cosine search in numpy, persisted to a directory.

The default when no Elasticsearch URL is given. It scores as the Elasticsearch index does (the
``english`` analyzer, ``combined_fields`` BM25 with k1=1.2, b=0.75; cosine mapped to (1 + cos) / 2) and fuses
the same way.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from client.documents import Document
from client.errors import IndexMismatch, IndexNotFound, InputInvalid
from client.fusion import LegHit
from client.retrieval.analysis import analyze
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
from client.retrieval.bm25 import CombinedFieldsBM25

FORMAT_VERSION = 1


def _keywords(value: Any) -> list[str] | None:
    """A metadata value as the keywords a filter matches (None when it is not a scalar or a list of them)."""
    scalars = value if isinstance(value, list) else [value]
    if not all(isinstance(item, str | int | float | bool) for item in scalars):
        return None
    return [str(item).lower() if isinstance(item, bool) else str(item) for item in scalars]


@dataclass(frozen=True, eq=False)  # arrays do not compare as one value
class _Snapshot:
    """Everything a search reads, swapped in as one object: a search that holds one never sees half an ingest.
    Nothing in it is changed once it is swapped in; an ingest builds the next one."""

    dims: int | None = None
    embedding_model: str = ""
    documents: Mapping[str, Document] = field(default_factory=dict)  # row i of ``vectors`` is the i-th
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    bm25: CombinedFieldsBM25 | None = None

    def leg_hits(self, request: SearchRequest) -> dict[str, list[LegHit]]:
        allowed = self._filter_mask(request.filters)
        ids = list(self.documents)
        legs = {}
        if BM25_LEG in request.legs:
            scores = self._bm25_scores(request.query, request.title_boost)
            # Like a match query: only documents sharing a term with the query are hits.
            legs[BM25_LEG] = _top(scores, allowed & (scores > 0), request.size, ids)
        if VECTOR_LEG in request.legs:
            assert request.query_vector is not None  # SearchRequest checks it
            cosine = self.vectors @ _normalized(request.query_vector)
            legs[VECTOR_LEG] = _top((1.0 + cosine) / 2.0, allowed, request.size, ids)
        return legs

    def _bm25_scores(self, query: str, title_boost: float) -> np.ndarray:
        if self.bm25 is None:
            return np.zeros(len(self.documents), dtype=np.float64)
        return self.bm25.scores(analyze(query), (title_boost, 1.0))

    def _filter_mask(self, filters: Mapping[str, Any]) -> np.ndarray:
        mask = np.ones(len(self.documents), dtype=bool)
        for name, value in filters.items():
            wanted = set(filter_values(value))
            for row, document in enumerate(self.documents.values()):
                keywords = _keywords(document.metadata[name]) if name in document.metadata else None
                mask[row] &= bool(keywords and wanted.intersection(keywords))
        return mask

    def fetch(self, ids: list[str]) -> dict[str, Document]:
        return {doc_id: self.documents[doc_id] for doc_id in ids}


class EmbeddedRetriever:
    """Hybrid BM25 + exact-cosine retrieval over documents kept in memory and saved under ``directory``.

    Safe to share between threads: ingests run one at a time, and each search reads the snapshot that was
    current when it started, so it sees a whole ingest or none of it.
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self._ingest_lock = threading.Lock()
        self._snapshot = _Snapshot()
        if (self.directory / "manifest.json").is_file():
            self._snapshot = self._load()

    @property
    def dims(self) -> int | None:
        return self._snapshot.dims

    @property
    def embedding_model(self) -> str:
        return self._snapshot.embedding_model

    # ---- ingest -------------------------------------------------------------------------------------

    def create_index(self, dims: int, embedding_model: str = "") -> bool:
        with self._ingest_lock:
            current = self._snapshot
            if current.dims is not None:
                index = f"the embedded index in {self.directory}"
                check_vectors(index, current.dims, current.embedding_model, dims, embedding_model)
                return False
            self._commit(_Snapshot(dims, embedding_model, vectors=np.zeros((0, dims), dtype=np.float32)))
            return True

    def index_documents(self, documents: Iterable[tuple[Document, np.ndarray]]) -> Iterator[IndexOutcome]:
        dims = self.dims
        if dims is None:
            raise RuntimeError("create_index must run before documents are indexed")
        # Read (and embed) outside the lock: only the merge into the current snapshot waits for other ingests.
        checked = [(document, vector, _refusal(document, vector, dims)) for document, vector in documents]
        with self._ingest_lock:
            current = self._snapshot
            merged = dict(current.documents)
            rows = {doc_id: row for row, doc_id in enumerate(merged)}
            vectors = list(current.vectors)
            for document, vector, refusal in checked:
                if refusal is not None:
                    continue
                if document.id in rows:  # replace in place: a rerun updates rather than duplicates
                    vectors[rows[document.id]] = _normalized(vector)
                else:
                    rows[document.id] = len(vectors)
                    vectors.append(_normalized(vector))
                merged[document.id] = document
            stacked = np.stack(vectors) if vectors else np.zeros((0, dims), dtype=np.float32)
            self._commit(replace(current, documents=merged, vectors=stacked, bm25=_bm25(merged)))
        yield from (IndexOutcome(document.id, refusal) for document, _, refusal in checked)

    def count(self) -> int:
        return len(self._snapshot.documents)

    # ---- search -------------------------------------------------------------------------------------

    def candidate_pages(self, request: SearchRequest) -> Iterator[list[Candidate]]:
        if request.fusion != "client":
            raise ValueError("the embedded retriever fuses in the client only")
        snapshot = self._snapshot  # every page comes from this one, whatever ingests meanwhile
        if snapshot.dims is None:
            state = "holds no embedded index" if self.directory.is_dir() else "does not exist"
            raise IndexNotFound(
                f"{self.directory} {state}: ingest documents first (rerank-client ingest FILE --index-dir "
                f"{self.directory}), or set --index-dir (RERANK_CLIENT_INDEX_DIR) to an index"
            )
        check_query_vector(
            request, f"the embedded index in {self.directory}", snapshot.dims, snapshot.embedding_model
        )
        return fused_pages(
            request.fuse(snapshot.leg_hits(request)), request.page_size, snapshot.fetch, _never_missing
        )

    def leg_hits(self, request: SearchRequest) -> dict[str, list[LegHit]]:
        return self._snapshot.leg_hits(request)

    def close(self) -> None:
        """Nothing to release: every change is saved as it is made."""

    # ---- persistence --------------------------------------------------------------------------------

    def _commit(self, snapshot: _Snapshot) -> None:
        """Saves ``snapshot``, then makes it the one searches read (the ingest lock is held)."""
        try:
            self._write(snapshot)
        except OSError as exc:
            raise InputInvalid(
                f"cannot write the embedded index in {self.directory} ({exc.strerror or exc}): set "
                "--index-dir to a directory you can write"
            ) from exc
        self._snapshot = snapshot

    def _write(self, snapshot: _Snapshot) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        documents = snapshot.documents.values()
        _replace(self.directory / "vectors.npy", lambda path: np.save(path, snapshot.vectors))
        _replace(
            self.directory / "documents.jsonl",
            lambda path: path.write_text(
                "".join(json.dumps(asdict(d), ensure_ascii=False) + "\n" for d in documents),
                encoding="utf-8",
            ),
        )
        # The manifest goes last: a directory with a manifest is complete.
        manifest = {
            "format_version": FORMAT_VERSION,
            "dims": snapshot.dims,
            "embedding_model": snapshot.embedding_model,
            "documents": len(snapshot.documents),
        }
        _replace(self.directory / "manifest.json", lambda path: path.write_text(json.dumps(manifest)))

    def _load(self) -> _Snapshot:
        try:
            manifest = json.loads((self.directory / "manifest.json").read_text())
            version = manifest["format_version"]
            if version != FORMAT_VERSION:
                raise IndexMismatch(
                    f"{self.directory} holds an embedded index of format {version}, not {FORMAT_VERSION}: "
                    "ingest again into a new --index-dir"
                )
            dims = int(manifest["dims"])
            embedding_model = str(manifest.get("embedding_model", ""))  # not recorded before issue 16
            expected = int(manifest["documents"])
            with (self.directory / "documents.jsonl").open(encoding="utf-8") as lines:
                documents = [Document(**json.loads(line)) for line in lines]
            vectors = np.load(self.directory / "vectors.npy")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputInvalid(
                f"{self.directory} holds a damaged embedded index ({exc!r}): ingest again into a new "
                "--index-dir"
            ) from exc
        by_id = {document.id: document for document in documents}
        # Row i of the vectors belongs to the i-th document: with counts that differ, no row can be trusted.
        if not (expected == len(documents) == len(by_id) and vectors.shape == (expected, dims)):
            raise InputInvalid(
                f"{self.directory} holds a damaged embedded index: its manifest counts {expected} documents "
                f"of {dims} dimensions, documents.jsonl holds {len(documents)} ({len(by_id)} distinct ids), "
                f"vectors.npy an array of shape {vectors.shape}: ingest again into a new --index-dir"
            )
        # Rebuilding BM25 is cheaper to keep correct than a second on-disk format.
        return _Snapshot(dims, embedding_model, by_id, vectors, _bm25(by_id))


def _refusal(document: Document, vector: np.ndarray, dims: int) -> str | None:
    """Why the index refuses ``document`` with ``vector``; None when it takes them."""
    if vector.shape != (dims,):
        return f"vector has shape {vector.shape}, the index holds {dims} dimensions"
    if not np.isfinite(vector).all():
        return "vector holds NaN or infinite values, which no search can rank"
    for name, value in document.metadata.items():
        if _keywords(value) is None:
            return f"metadata field {name!r} must be a string, number, boolean or a list of them"
    return None


def _bm25(documents: Mapping[str, Document]) -> CombinedFieldsBM25 | None:
    if not documents:
        return None
    return CombinedFieldsBM25(
        [
            [analyze(document.title) for document in documents.values()],
            [analyze(document.text) for document in documents.values()],
        ]
    )


def _normalized(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def _top(scores: np.ndarray, allowed: np.ndarray, size: int, ids: list[str]) -> list[LegHit]:
    rows = np.flatnonzero(allowed)
    # Stable sort on the negated score: equal scores keep index order, as Lucene breaks ties by doc id.
    best = rows[np.argsort(-scores[rows], kind="stable")[:size]]
    return [LegHit(ids[row], float(scores[row])) for row in best]


def _never_missing(doc_id: str) -> None:
    raise AssertionError(f"document {doc_id} vanished from memory")


def _replace(path: Path, write: Any) -> None:
    """Write to a temporary file, then rename over ``path``, so a crash never leaves half a file. Each save
    stages under a name of its own: a shared one let two saves write, or rename away, each other's file."""
    temporary = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp{path.suffix}")  # np.save keeps .npy
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
