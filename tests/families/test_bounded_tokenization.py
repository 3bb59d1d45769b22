"""Huge texts are cut by characters before they are tokenized, at a bound well above what a pair can
use: the tokenizer reads a bounded part of a megabyte, and the pairs, truncated or chunked, left or
right, are exactly those of tokenizing it whole, on every family."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

import sidecar.model.tokenization as tokenization
from sidecar.model.loading import ModelSource, load_cross_encoder
from sidecar.model.tokenization import PairSpec, PairTokenizer, Truncation
from tests.families.conftest import FamilyModels
from tests.families.test_pair_budget import FAMILIES

MEGABYTE = 1 << 20
SENTENCE = "Cats are obligate carnivores; they eat meat, fish and sometimes insects. "
# Far past the cut at every spec below, and small enough to tokenize whole for the reference.
LONG = 1 << 13
HUGE = [
    SENTENCE * (LONG // len(SENTENCE)),
    "x" * LONG,  # one long word
    "a" + " " * LONG + "b",  # whitespace: few tokens, so it is tokenized whole
    "short",
]


def specs(smallest: int) -> list[PairSpec]:
    """Truncated right, truncated left, and chunked, above the model's smallest max_length."""
    return [
        PairSpec(max_length=2 * smallest + 40),
        PairSpec(max_length=2 * smallest + 200, truncation=Truncation.LEFT),
        PairSpec(max_length=2 * smallest + 60, chunk=True, max_chunks_per_doc=2, chunk_overlap=4),
    ]


class RecordingTokenizer:
    """Passes every call to the Rust tokenizer; records the longest text it was given."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.longest = 0

    def _seen(self, texts: Sequence[str]) -> None:
        self.longest = max([self.longest, *(len(text) for text in texts)])

    def encode(self, text: str, *args: Any, **kwargs: Any) -> Any:
        self._seen([text])
        return self._inner.encode(text, *args, **kwargs)

    def encode_batch(self, texts: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        self._seen(texts)
        return self._inner.encode_batch(texts, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def pairs(tokenizer: PairTokenizer, query: str, spec: PairSpec) -> list[tuple[list[int], int]]:
    encoded = tokenizer.encode(query, HUGE, spec)
    return [
        (pair.input_ids, document)
        for pair, document in zip(encoded.pairs, encoded.document_of_pair, strict=True)
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_huge_texts_give_the_pairs_of_tokenizing_them_whole(
    family_models: FamilyModels, family: str, monkeypatch: pytest.MonkeyPatch
):
    tokenizer = load_cross_encoder(ModelSource(str(family_models[family]))).tokenizer
    recording = RecordingTokenizer(tokenizer._tokenizer)
    tokenizer._tokenizer = recording  # type: ignore[assignment]
    query = SENTENCE * 40  # a long query is cut too
    cases = specs(tokenizer.min_max_length())
    bounded = [pairs(tokenizer, query, spec) for spec in cases]
    # Where the cut leaves too few tokens, the whole text is read (whitespace, for most tokenizers, and
    # for WordPiece the long word, one [UNK]): it tokenizes to almost nothing. A megabyte of prose and
    # a query of it are read only as far as the pairs can use.
    recording.longest = 0
    megabyte = SENTENCE * (MEGABYTE // len(SENTENCE))
    tokenizer.encode(megabyte, [megabyte], cases[2])
    assert recording.longest <= (cases[2].max_length * 2 + 8) * 16 + len(tokenizer.instruction) + 200
    monkeypatch.setattr(tokenization, "_CHARS_PER_TOKEN", 10 * MEGABYTE)  # no cut: tokenized whole
    assert bounded == [pairs(tokenizer, query, spec) for spec in cases]


def test_embedding_texts_and_truncate_false_read_a_bounded_part(family_models: FamilyModels):
    tokenizer = load_cross_encoder(ModelSource(str(family_models["bert"]))).tokenizer
    recording = RecordingTokenizer(tokenizer._tokenizer)
    tokenizer._tokenizer = recording  # type: ignore[assignment]
    spec = PairSpec(max_length=32)
    megabyte = SENTENCE * (MEGABYTE // len(SENTENCE))
    texts = tokenizer.encode_texts([megabyte, megabyte], spec)
    assert recording.longest <= (32 + 8) * 16
    assert all(len(pair) == 32 for pair in texts.pairs)
    with pytest.raises(tokenization.InvalidArgument, match="longer than the 30 tokens"):
        tokenizer.encode_texts([megabyte], PairSpec(max_length=32, truncate=False))
