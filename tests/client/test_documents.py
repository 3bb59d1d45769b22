from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.documents import Document, Rejected, count_records, read_documents, stable_id
from client.errors import InputInvalid

SCIFACT = Path(__file__).resolve().parents[3] / "shared" / "data" / "scifact"


def test_jsonl_records_become_documents_with_stable_ids(tmp_path: Path):
    source = tmp_path / "docs.jsonl"
    lines = [
        {"id": 7, "text": "t", "metadata": {"lang": "en"}},
        {"title": "T", "text": "no id"},
        {"_id": "x", "text": ""},
        [1, 2],
    ]
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n{broken\n")

    records = list(read_documents(source))

    assert records[0] == Document("7", "t", metadata={"lang": "en"})
    assert records[1] == Document(stable_id("no id", "T"), "no id", "T")
    assert list(read_documents(source))[1].id == records[1].id  # the same on every read
    assert records[1].passage == "T\nno id"
    assert [type(r) for r in records[2:]] == [Rejected, Rejected, Rejected]
    assert [r.id for r in records[2:]] == ["x", "docs.jsonl:4", "docs.jsonl:6"]
    assert count_records(source) == 5


def test_a_directory_without_a_beir_corpus_is_an_error(tmp_path: Path):
    with pytest.raises(InputInvalid, match=r"corpus\.jsonl"):
        read_documents(tmp_path)


@pytest.mark.skipif(not SCIFACT.is_dir(), reason="BEIR SciFact is not in ../shared/data")
def test_reads_the_beir_scifact_corpus():
    documents = list(read_documents(SCIFACT))
    assert len(documents) == count_records(SCIFACT) == 5183
    assert all(isinstance(d, Document) and d.title and d.text for d in documents)
