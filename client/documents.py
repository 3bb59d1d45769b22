"""Documents to index: reading JSONL and BEIR corpora, stable ids, and the text models see."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.errors import InputInvalid, InputMissing, unreadable


@dataclass(frozen=True)
class Document:
    """One document. ``metadata`` values are indexed as keywords and can be filtered on."""

    id: str
    text: str
    title: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def passage(self) -> str:
        """What the embedding model and the reranker read: the title, then the text (BEIR's convention)."""
        return f"{self.title}\n{self.text}" if self.title else self.text


@dataclass(frozen=True)
class Rejected:
    """A record that could not become a document, or that the index refused."""

    id: str
    reason: str


def stable_id(text: str, title: str = "") -> str:
    """An id from the content, so that ingesting the same file twice updates rather than duplicates."""
    return hashlib.sha256(f"{title}\x00{text}".encode()).hexdigest()[:32]


def document_from_record(record: Any, fallback_id: str) -> Document | Rejected:
    """A document from one JSON object (``_id`` or ``id``, ``text``, optional ``title`` and ``metadata``)."""
    if not isinstance(record, dict):
        return Rejected(fallback_id, f"expected a JSON object, got {type(record).__name__}")
    raw_id = record.get("_id", record.get("id"))
    text, title = record.get("text"), record.get("title") or ""
    metadata = record.get("metadata") or {}
    doc_id = str(raw_id) if raw_id not in (None, "") else None
    if not isinstance(text, str) or not text.strip():
        return Rejected(doc_id or fallback_id, "`text` must be a non-empty string")
    if not isinstance(title, str):
        return Rejected(doc_id or fallback_id, "`title` must be a string")
    if not isinstance(metadata, dict):
        return Rejected(doc_id or fallback_id, "`metadata` must be a JSON object")
    return Document(id=doc_id or stable_id(text, title), text=text, title=title, metadata=metadata)


def read_jsonl(path: Path) -> Iterator[Document | Rejected]:
    """Documents from a JSON Lines file, one object per line; bad lines come out as ``Rejected``.

    A file that is not UTF-8, or not one line of which is JSON, is not JSON Lines at all: ``InputInvalid``.
    """
    try:
        with path.open(encoding="utf-8") as lines:
            parsed, first_error = False, ""
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                location = f"{path.name}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    first_error = first_error or f"line {number}: {exc}"
                    yield Rejected(location, f"invalid JSON: {exc}")
                    continue
                parsed = True
                yield document_from_record(record, location)
    except UnicodeDecodeError as exc:
        raise InputInvalid(f"{path} is not UTF-8 text (byte {exc.start}): give a JSONL file") from exc
    except OSError as exc:
        raise unreadable(path, "the file", exc) from exc
    if first_error and not parsed:
        raise InputInvalid(
            f"{path} is not JSON Lines: no line is JSON ({first_error}); give one JSON object per line"
        )


def documents_file(source: Path) -> Path:
    """The JSONL file of ``source``: the file itself, or a BEIR dataset directory's ``corpus.jsonl``."""
    if not source.exists():
        raise InputMissing(f"{source} does not exist: give a JSONL file or a BEIR dataset directory")
    if source.is_dir():
        corpus = source / "corpus.jsonl"
        if not corpus.is_file():
            raise InputInvalid(
                f"{source} is a directory without a corpus.jsonl: give a JSONL file or a BEIR dataset "
                "directory"
            )
        return corpus
    return source


def read_documents(source: Path) -> Iterator[Document | Rejected]:
    """A BEIR dataset directory (its ``corpus.jsonl``) or a JSONL file."""
    return read_jsonl(documents_file(source))


def count_records(source: Path) -> int:
    """Non-blank lines of the file ``read_documents`` would read: the progress bar's total."""
    path = documents_file(source)
    try:
        with path.open("rb") as lines:
            return sum(1 for line in lines if line.strip())
    except OSError as exc:
        raise unreadable(path, "the file", exc) from exc
