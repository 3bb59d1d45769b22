"""``rerank-client demo``: the packaged clauses and golden questions, and the whole walkthrough end to end
with the sidecar it starts itself (the real all-MiniLM-L6-v2 embedding and reranking)."""

from __future__ import annotations

import io
import re
import socket
from pathlib import Path

import pytest
from rich.console import Console

from client.demo.walkthrough import load_clauses, load_golden, run_demo
from client.retrieval.analysis import analyze
from client.settings import DemoSettings, settings_table

README = Path(__file__).resolve().parents[2] / "README.md"

# Words too common to count as a shared keyword between a question and a clause.
STOPWORDS = frozenset(
    "a an the is are be if we us our to of in on for by can do does what who how there like must get gets "  # noqa: SIM905
    "keep and or with any up out before after every another their its it this that".split()
)
# The reranker here is a 22M-parameter bi-encoder trained on general web text, not on contracts; four of the
# questions share no content word with their clause by design. 12 of 16 (75%) leaves room for a clause the
# model reasonably confuses with the expected one, yet fails on a broken stage or lost candidates (the
# measured figure is 15 of 16: "hire away the people" ranks other consulting clauses above non-solicitation).
MIN_FOUND = 12


def test_the_packaged_corpus_covers_the_clause_types_and_the_golden_set_refers_to_it():
    clauses = {clause.id: clause for clause in load_clauses()}
    golden = load_golden()
    assert len(clauses) >= 60
    assert all(clause.metadata["contract"] and clause.metadata["clause_type"] for clause in clauses.values())
    assert len({clause.metadata["clause_type"] for clause in clauses.values()}) >= 15
    assert len(golden) >= 10
    for question in golden:
        assert question.expected <= set(clauses), question.question
        if question.no_keyword_overlap:
            # The terms BM25 matches: stemmed, over the title and the text.
            words = set(analyze(question.question)) - set(analyze(" ".join(STOPWORDS)))
            for clause_id in question.expected:
                clause = clauses[clause_id]
                terms = set(analyze(f"{clause.title} {clause.text}"))
                assert not words & terms, (question.question, clause_id, words & terms)
    assert sum(question.no_keyword_overlap for question in golden) >= 3


def test_readme_documents_every_demo_setting():
    rows = "\n".join(settings_table(DemoSettings).splitlines()[2:])
    assert rows in README.read_text(), "README's demo settings are stale: paste `python -m client.settings`"


@pytest.mark.slow
def test_the_demo_starts_a_sidecar_answers_the_golden_questions_and_stops_it():
    output = io.StringIO()
    report = run_demo(DemoSettings(), Console(file=output, width=200))

    printed = output.getvalue()
    assert len(report.answers) == len(load_golden())
    assert report.found >= MIN_FOUND, [a.golden.question for a in report.answers if not a.found]
    assert report.reranker == "sentence-transformers/all-MiniLM-L6-v2"
    for answer in report.answers:
        assert answer.response.reranked
        assert len(answer.response.results) == 3
        assert answer.golden.question in printed
    # Both stages' scores and the timings are shown.
    assert re.search(r"\brerank \d+ ms, total \d+ ms", printed)
    assert f"Golden questions: {report.found} of {len(report.answers)}" in printed
    host, port = report.sidecar.rsplit(":", 1)
    with socket.socket() as sock:
        assert sock.connect_ex((host, int(port))) != 0  # stopped on the way out
