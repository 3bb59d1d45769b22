from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from sidecar.model.batch import EncodedPair
from sidecar.model.loading import ModelSource, load_cross_encoder
from sidecar.model.tokenization import EncodedDocuments, PairSpec
from sidecar.scheduling.tokenizer_pool import TokenizerPool


async def test_a_large_request_split_across_threads_encodes_as_one_call(tiny_bert: Path):
    model = load_cross_encoder(ModelSource(str(tiny_bert)))
    # Varied lengths, several of them chunked into more than one pair.
    documents = [" ".join(f"word{i}" for i in range(index % 7 * 15 + 1)) for index in range(53)]
    pool = TokenizerPool(workers=3)
    try:
        chunked = PairSpec(max_length=32, chunk=True, max_chunks_per_doc=4, chunk_overlap=4)
        for spec in (PairSpec(max_length=32), chunked):
            whole = model.tokenizer.encode("a query", documents, spec)
            split = await pool.encode(partial(model.tokenizer.encode, "a query", spec=spec), documents)
            assert split.document_of_pair == whole.document_of_pair
            assert split.pairs == whole.pairs
        assert max(whole.document_of_pair) == len(documents) - 1
        assert len(whole.pairs) > len(documents)  # the chunked case really chunked
    finally:
        pool.shutdown()


def test_tokenizer_workers_default_to_the_usable_cores_at_most_8(monkeypatch):
    import os

    from sidecar.scheduling.tokenizer_pool import tokenizer_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert tokenizer_workers(0) == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert tokenizer_workers(0) == 2
    assert tokenizer_workers(3) == 3  # an operator's value is kept as given


async def test_under_load_a_request_is_tokenized_as_one_slice():
    sizes: list[int] = []
    release = threading.Event()

    def encode(documents: Sequence[str]) -> EncodedDocuments:
        sizes.append(len(documents))
        release.wait(timeout=10)
        return EncodedDocuments(
            [EncodedPair([len(text)], [0]) for text in documents], list(range(len(documents)))
        )

    pool = TokenizerPool(workers=3)
    try:
        first = asyncio.create_task(pool.encode(encode, ["a"] * 48))
        await asyncio.sleep(0.05)  # its three slices now hold every worker
        second = asyncio.create_task(pool.encode(encode, ["bb"] * 48))
        await asyncio.sleep(0.05)
        release.set()
        merged = await asyncio.gather(first, second)
    finally:
        pool.shutdown()
    assert sorted(sizes) == [16, 16, 16, 48]
    assert [pair.input_ids for pair in merged[1].pairs] == [[2]] * 48
    assert merged[0].document_of_pair == list(range(48))
