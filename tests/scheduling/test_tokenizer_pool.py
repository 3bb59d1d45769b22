from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from sidecar.errors import InvalidArgument, TokenizationFailure
from sidecar.model import hardware
from sidecar.model.batch import EncodedPair
from sidecar.model.loading import CrossEncoderModel, ModelSource, load_cross_encoder
from sidecar.model.tokenization import EncodedDocuments, PairSpec, PairTokenizer, RowEncoder
from sidecar.scheduling.tokenizer_pool import TokenizerPool, tokenizes_in_processes
from tests.conftest import wait_until

# Varied lengths, several of them chunked into more than one pair.
DOCUMENTS = [" ".join(f"word{i}" for i in range(index % 7 * 15 + 1)) for index in range(53)]
CHUNKED = PairSpec(max_length=32, chunk=True, max_chunks_per_doc=4, chunk_overlap=4)


def rows(encoded: EncodedDocuments) -> list[tuple[list[int], list[int]]]:
    """The rows as plain lists, however they are stored (lists, or views of a process's arrays)."""
    return [(list(map(int, pair.input_ids)), list(map(int, pair.token_type_ids))) for pair in encoded.pairs]


@pytest.fixture(scope="module")
def model(tiny_bert: Path) -> CrossEncoderModel:
    return load_cross_encoder(ModelSource(str(tiny_bert)))


@pytest.fixture
async def process_pool() -> AsyncIterator[TokenizerPool]:
    pool = TokenizerPool(workers=2, processes=True)
    yield pool
    await pool.close()


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
async def test_a_large_request_split_across_workers_encodes_as_one_call(
    model: CrossEncoderModel, processes: bool
):
    pool = TokenizerPool(workers=3, processes=processes)
    try:
        for spec in (PairSpec(max_length=32), CHUNKED):
            whole = model.tokenizer.encode("a query", DOCUMENTS, spec)
            split = await pool.encode(RowEncoder(model.tokenizer, spec, "a query"), DOCUMENTS)
            assert split.document_of_pair == whole.document_of_pair
            assert rows(split) == rows(whole)
        assert max(whole.document_of_pair) == len(DOCUMENTS) - 1
        assert len(whole.pairs) > len(DOCUMENTS)  # the chunked case really chunked
        texts = await pool.encode(RowEncoder(model.tokenizer, CHUNKED), DOCUMENTS)  # a bi-encoder's rows
        assert rows(texts) == rows(model.tokenizer.encode_texts(DOCUMENTS, CHUNKED))
    finally:
        await pool.close()


def test_tokenizer_workers_default_to_the_usable_cores_at_most_8(monkeypatch):
    from sidecar.scheduling.tokenizer_pool import tokenizer_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert tokenizer_workers(0) == 8
    monkeypatch.setattr(hardware, "cpu_quota", lambda root, proc: 3.5)  # a container's CPU limit
    assert tokenizer_workers(0) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert tokenizer_workers(0) == 2
    assert tokenizer_workers(3) == 3  # an operator's value is kept as given


def test_auto_tokenizes_in_processes_on_a_gpu_and_in_threads_on_a_cpu():
    assert tokenizes_in_processes("auto", "cuda")
    assert tokenizes_in_processes("auto", "cuda:1")
    assert not tokenizes_in_processes("auto", "cpu")
    assert tokenizes_in_processes("processes", "cpu")
    assert not tokenizes_in_processes("threads", "cuda")


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
        first = asyncio.create_task(pool.encode(encode, ["a"] * 48))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)  # its three slices now hold every worker
        second = asyncio.create_task(pool.encode(encode, ["bb"] * 48))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        release.set()
        merged = await asyncio.gather(first, second)
    finally:
        await pool.close()
    assert sorted(sizes) == [16, 16, 16, 48]
    assert [pair.input_ids for pair in merged[1].pairs] == [[2]] * 48
    assert merged[0].document_of_pair == list(range(48))


async def test_a_process_hands_back_the_requests_bad_input_as_its_error_and_serves_on(
    model: CrossEncoderModel, process_pool: TokenizerPool
):
    refused = PairSpec(max_length=16, truncate=False)
    with pytest.raises(InvalidArgument, match="truncation is off"):
        await process_pool.encode(RowEncoder(model.tokenizer, refused, "a query"), DOCUMENTS[-3:])
    spec = PairSpec(max_length=32)
    encoded = await process_pool.encode(RowEncoder(model.tokenizer, spec, "a query"), DOCUMENTS[:5])
    assert rows(encoded) == rows(model.tokenizer.encode("a query", DOCUMENTS[:5], spec))


async def test_a_process_that_died_is_replaced_and_its_slice_retried(
    model: CrossEncoderModel, process_pool: TokenizerPool
):
    encoder = RowEncoder(model.tokenizer, PairSpec(max_length=32), "a query")
    await process_pool.share(model.tokenizer)
    for process in list(process_pool._every_process):  # as the kernel's OOM killer would
        process._process.kill()
        await process._process.wait()
    encoded = await process_pool.encode(encoder, DOCUMENTS[:4])
    assert rows(encoded) == rows(encoder(DOCUMENTS[:4]))
    # Every process that died is replaced (the second while the first served the retry), and the pool
    # still splits a request across them.
    await wait_until(lambda: len(process_pool._every_process) == 2)
    assert all(process.returncode is None for process in process_pool._every_process)
    split = await process_pool.encode(encoder, DOCUMENTS)
    assert rows(split) == rows(encoder(DOCUMENTS))


class DyingTokenizer(PairTokenizer):
    """Kills the tokenizer process that encodes with it (imported by that process when unpickled)."""

    def encode(self, query: str, documents: Sequence[str], spec: PairSpec) -> EncodedDocuments:
        os._exit(3)


async def test_a_request_whose_process_dies_twice_fails_with_a_clear_error(
    model: CrossEncoderModel, process_pool: TokenizerPool
):
    dying = RowEncoder(DyingTokenizer(model.tokenizer._tokenizer), PairSpec(max_length=32), "a query")
    with pytest.raises(TokenizationFailure, match="died on this request twice"):
        await process_pool.encode(dying, DOCUMENTS[:4])
    healthy = RowEncoder(model.tokenizer, PairSpec(max_length=32), "a query")
    assert rows(await process_pool.encode(healthy, DOCUMENTS[:4])) == rows(healthy(DOCUMENTS[:4]))


class ChattyTokenizer(PairTokenizer):
    """Writes to stdout as it encodes, from Python and straight to the file descriptor as C code would."""

    def encode(self, query: str, documents: Sequence[str], spec: PairSpec) -> EncodedDocuments:
        print("encoding", len(documents), "documents")
        os.write(1, b"a library's own line\n")
        return super().encode(query, documents, spec)


async def test_what_a_tokenizer_writes_to_stdout_never_reaches_the_answers(
    model: CrossEncoderModel, process_pool: TokenizerPool
):
    chatty = RowEncoder(ChattyTokenizer(model.tokenizer._tokenizer), PairSpec(max_length=32), "a query")
    for _ in range(3):
        assert rows(await process_pool.encode(chatty, DOCUMENTS[:5])) == rows(chatty(DOCUMENTS[:5]))


async def test_closing_the_pool_stops_its_processes(model: CrossEncoderModel):
    pool = TokenizerPool(workers=2, processes=True)
    await pool.start()
    processes = [process._process for process in pool._every_process]
    await pool.close()
    assert [process.returncode for process in processes] == [0, 0]
