"""Stage 1 in-process: BM25F over title and text, and exact cosine search in numpy, persisted to a directory.

The default when no Elasticsearch URL is given. It scores as the Elasticsearch index does (the
``english`` analyzer, ``combined_fields`` BM25 with k1=1.2, b=0.75; cosine mapped to (1 + cos) / 2) and fuses
the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict
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


class EmbeddedRetriever:
    """Hybrid BM25 + exact-cosine retrieval over documents kept in memory and saved under ``directory``."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.dims: int | None = None
        self.embedding_model = ""
        self._documents: dict[str, Document] = {}
        self._vectors = np.zeros((0, 0), dtype=np.float32)
        self._bm25: CombinedFieldsBM25 | None = None
        if (self.directory / "manifest.json").is_file():
            self._load()

    # ---- ingest -------------------------------------------------------------------------------------

    def create_index(self, dims: int, embedding_model: str = "") -> bool:
        if self.dims is not None:
            index = f"the embedded index in {self.directory}"
            check_vectors(index, self.dims, self.embedding_model, dims, embedding_model)
            return False
        self.dims = dims
        self.embedding_model = embedding_model
        self._vectors = np.zeros((0, dims), dtype=np.float32)
        self._save()
        return True

    def index_documents(self, documents: Iterable[tuple[Document, np.ndarray]]) -> Iterator[IndexOutcome]:
        if self.dims is None:
            raise RuntimeError("create_index must run before documents are indexed")
        rows = {doc_id: row for row, doc_id in enumerate(self._documents)}
        vectors = list(self._vectors)
        outcomes = []
        for document, vector in documents:
            error = self._validate(document, vector)
            if error is None:
                if document.id in rows:  # replace in place: a rerun updates rather than duplicates
                    vectors[rows[document.id]] = _normalized(vector)
                else:
                    rows[document.id] = len(vectors)
                    vectors.append(_normalized(vector))
                self._documents[document.id] = document
            outcomes.append(IndexOutcome(document.id, error))
        self._vectors = np.stack(vectors) if vectors else np.zeros((0, self.dims), dtype=np.float32)
        self._build_bm25()
        self._save()
        yield from outcomes

    def _validate(self, document: Document, vector: np.ndarray) -> str | None:
        if vector.shape != (self.dims,):
            return f"vector has shape {vector.shape}, the index holds {self.dims} dimensions"
        for name, value in document.metadata.items():
            if _keywords(value) is None:
                return f"metadata field {name!r} must be a string, number, boolean or a list of them"
        return None

    def count(self) -> int:
        return len(self._documents)

    # ---- search -------------------------------------------------------------------------------------

    def candidate_pages(self, request: SearchRequest) -> Iterator[list[Candidate]]:
        if request.fusion != "client":
            raise ValueError("the embedded retriever fuses in the client only")
        if self.dims is None:
            state = "holds no embedded index" if self.directory.is_dir() else "does not exist"
            raise IndexNotFound(
                f"{self.directory} {state}: ingest documents first (rerank-client ingest FILE --index-dir "
                f"{self.directory}), or set --index-dir (RERANK_CLIENT_INDEX_DIR) to an index"
            )
        check_query_vector(
            request, f"the embedded index in {self.directory}", self.dims, self.embedding_model
        )
        return fused_pages(
            request.fuse(self.leg_hits(request)), request.page_size, self._fetch, _never_missing
        )

    def leg_hits(self, request: SearchRequest) -> dict[str, list[LegHit]]:
        allowed = self._filter_mask(request.filters)
        legs = {}
        if BM25_LEG in request.legs:
            scores = self._bm25_scores(request.query, request.title_boost)
            # Like a match query: only documents sharing a term with the query are hits.
            legs[BM25_LEG] = _top(scores, allowed & (scores > 0), request.size, list(self._documents))
        if VECTOR_LEG in request.legs:
            assert request.query_vector is not None  # SearchRequest checks it
            cosine = self._vectors @ _normalized(request.query_vector)
            legs[VECTOR_LEG] = _top((1.0 + cosine) / 2.0, allowed, request.size, list(self._documents))
        return legs

    def _bm25_scores(self, query: str, title_boost: float) -> np.ndarray:
        if self._bm25 is None:
            return np.zeros(len(self._documents), dtype=np.float64)
        return self._bm25.scores(analyze(query), (title_boost, 1.0))

    def _filter_mask(self, filters: Mapping[str, Any]) -> np.ndarray:
        mask = np.ones(len(self._documents), dtype=bool)
        for name, value in filters.items():
            wanted = set(filter_values(value))
            for row, document in enumerate(self._documents.values()):
                keywords = _keywords(document.metadata[name]) if name in document.metadata else None
                mask[row] &= bool(keywords and wanted.intersection(keywords))
        return mask

    def _fetch(self, ids: list[str]) -> dict[str, Document]:
        return {doc_id: self._documents[doc_id] for doc_id in ids}

    def close(self) -> None:
        """Nothing to release: every change is saved as it is made."""

    # ---- persistence --------------------------------------------------------------------------------

    def _build_bm25(self) -> None:
        if not self._documents:
            self._bm25 = None
            return
        documents = self._documents.values()
        self._bm25 = CombinedFieldsBM25(
            [
                [analyze(document.title) for document in documents],
                [analyze(document.text) for document in documents],
            ]
        )

    def _save(self) -> None:
        try:
            self._write()
        except OSError as exc:
            raise InputInvalid(
                f"cannot write the embedded index in {self.directory} ({exc.strerror or exc}): set "
                "--index-dir to a directory you can write"
            ) from exc

    def _write(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        _replace(self.directory / "vectors.npy", lambda path: np.save(path, self._vectors))
        _replace(
            self.directory / "documents.jsonl",
            lambda path: path.write_text(
                "".join(json.dumps(asdict(d), ensure_ascii=False) + "\n" for d in self._documents.values()),
                encoding="utf-8",
            ),
        )
        # The manifest goes last: a directory with a manifest is complete.
        manifest = {
            "format_version": FORMAT_VERSION,
            "dims": self.dims,
            "embedding_model": self.embedding_model,
            "documents": len(self._documents),
        }
        _replace(self.directory / "manifest.json", lambda path: path.write_text(json.dumps(manifest)))

    def _load(self) -> None:
        try:
            manifest = json.loads((self.directory / "manifest.json").read_text())
            version = manifest["format_version"]
            if version != FORMAT_VERSION:
                raise IndexMismatch(
                    f"{self.directory} holds an embedded index of format {version}, not {FORMAT_VERSION}: "
                    "ingest again into a new --index-dir"
                )
            self.dims = int(manifest["dims"])
            self.embedding_model = str(manifest.get("embedding_model", ""))  # not recorded before issue 16
            with (self.directory / "documents.jsonl").open(encoding="utf-8") as lines:
                documents = [Document(**json.loads(line)) for line in lines]
            self._vectors = np.load(self.directory / "vectors.npy")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputInvalid(
                f"{self.directory} holds a damaged embedded index ({exc!r}): ingest again into a new "
                "--index-dir"
            ) from exc
        self._documents = {document.id: document for document in documents}
        self._build_bm25()  # rebuilding is cheaper to keep correct than a second on-disk format


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
    """Write to a temporary file, then rename over ``path``, so a crash never leaves half a file."""
    temporary = path.with_name(path.name + ".tmp" + path.suffix)
    write(temporary)
    os.replace(temporary, path)
