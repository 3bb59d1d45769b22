"""A decoder reranker's prompt: the tokens the model card builds, truncation and chunks of the document
only, and the instruction as a setting and a request field."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from transformers import AutoTokenizer

from rerank.v1 import rerank_pb2
from sidecar.errors import InvalidArgument, ModelLoadError
from sidecar.model.loading import ModelSource, load_cross_encoder
from sidecar.model.tokenization import PairSpec, PromptPairTokenizer, RowEncoder, Truncation
from sidecar.scheduling.tokenizer_pool import TokenizerPool
from testkit.model_cards import GEMMA_PROMPT, QWEN3_INSTRUCTION, QWEN3_SUFFIX
from tests.conftest import docs, running_sidecar
from tests.families.conftest import FamilyModels
from tests.families.references import gemma_card_ids, qwen3_card_ids, qwen3_card_scores

QUERY = "what do cats eat"
LONG = " ".join(["Cats are obligate carnivores and eat meat, fish and sometimes insects."] * 12)
TEXTS = [LONG, "", "  leading spaces", "123 starts with a number", "ends with a newline\n"]


@pytest.fixture(scope="module")
def qwen3(family_models: FamilyModels):
    return load_cross_encoder(ModelSource(str(family_models["qwen3-reranker"])))


@pytest.mark.parametrize("max_length", [160, 200, 1024])
def test_pairs_are_the_tokens_the_model_card_builds(qwen3, family_models: FamilyModels, max_length: int):
    tokenizer = AutoTokenizer.from_pretrained(family_models["qwen3-reranker"])
    pairs = qwen3.tokenizer.encode(QUERY, TEXTS, PairSpec(max_length=max_length)).pairs
    expected = qwen3_card_ids(tokenizer, QUERY, TEXTS, QWEN3_INSTRUCTION, max_length)
    assert [pair.input_ids for pair in pairs] == expected
    assert all(len(pair) <= max_length for pair in pairs)


@pytest.mark.parametrize("max_length", [100, 200, 1024])
def test_gemma_pairs_are_the_tokens_its_model_card_builds(family_models: FamilyModels, max_length: int):
    model_dir = family_models["bge-reranker-gemma"]
    gemma = load_cross_encoder(ModelSource(str(model_dir)))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The card's max_length leaves out the separator and the prompt after the passage; the sidecar's counts
    # every token.
    tail = len(tokenizer(f"\n{GEMMA_PROMPT}", add_special_tokens=False)["input_ids"])
    pairs = gemma.tokenizer.encode(QUERY, TEXTS, PairSpec(max_length=max_length + tail)).pairs
    expected = gemma_card_ids(tokenizer, QUERY, TEXTS, GEMMA_PROMPT, max_length)
    assert [pair.input_ids for pair in pairs] == expected


def test_left_truncation_and_chunks_cut_the_document_only(qwen3, family_models: FamilyModels):
    tokenizer: PromptPairTokenizer = qwen3.tokenizer
    suffix = len(AutoTokenizer.from_pretrained(family_models["qwen3-reranker"]).encode(QWEN3_SUFFIX))
    whole = tokenizer.encode(QUERY, [LONG], PairSpec(max_length=1024)).pairs[0].input_ids
    # The prompt, instruction and query, up to the document's first token.
    head = len(tokenizer.encode(QUERY, [""], PairSpec(max_length=1024)).pairs[0].input_ids) - suffix - 1
    left = tokenizer.encode(QUERY, [LONG], PairSpec(max_length=160, truncation=Truncation.LEFT)).pairs[0]
    kept = 160 - head - suffix
    assert left.input_ids == whole[:head] + whole[-suffix - kept :]  # the document's end, then the suffix
    chunks = tokenizer.encode(
        QUERY, [LONG], PairSpec(max_length=160, chunk=True, max_chunks_per_doc=50, chunk_overlap=8)
    ).pairs
    assert len(chunks) > 1
    for chunk in chunks:  # each keeps the whole prompt around a window of the document
        assert len(chunk) <= 160
        assert chunk.input_ids[:head] == whole[:head]
        assert chunk.input_ids[-suffix:] == whole[-suffix:]


def test_with_truncation_off_the_query_is_kept_whole_or_refused(qwen3):
    tokenizer: PromptPairTokenizer = qwen3.tokenizer
    query = " ".join(["cats"] * 70)
    whole = tokenizer.encode(query, ["meat and fish"], PairSpec(max_length=1024)).pairs[0].input_ids
    kept = tokenizer.encode(query, ["meat and fish"], PairSpec(max_length=len(whole), truncate=False)).pairs[
        0
    ]
    assert kept.input_ids == whole  # the query past half of max_length, not cut
    with pytest.raises(InvalidArgument, match="the query is longer") as refused:
        tokenizer.encode(query, ["meat and fish"], PairSpec(max_length=len(whole) - 5, truncate=False))
    assert refused.value.field == "query"


def test_chunks_are_cut_as_the_rust_tokenizer_cuts_them(qwen3):
    from sidecar.model.tokenization import _windows

    encoding = qwen3.tokenizer._tokenizer.encode(LONG, add_special_tokens=False)
    for budget, overlap in [(17, 0), (17, 5), (40, 39), (len(encoding.ids), 3)]:
        spec = PairSpec(max_length=0, chunk=True, max_chunks_per_doc=1000, chunk_overlap=overlap)
        rust = qwen3.tokenizer._tokenizer.encode(LONG, add_special_tokens=False)
        rust.truncate(budget, stride=overlap, direction="right")
        assert _windows(encoding.ids, budget, spec) == [rust.ids] + [piece.ids for piece in rust.overflowing]


def test_an_instruction_setting_on_an_encoder_is_refused_at_start(family_models: FamilyModels):
    with pytest.raises(ModelLoadError, match="reads no instruction"):
        load_cross_encoder(ModelSource(str(family_models["bert"])), instruction="Find recipes")


async def test_the_instruction_is_a_setting_and_a_request_field(family_models: FamilyModels):
    model = family_models["qwen3-reranker"]
    texts = ("Cats are obligate carnivores and eat meat.", "A recipe for vegetable soup with carrots.", "")
    setting, field = "Find passages that mention animals", "Find cooking recipes"
    request = rerank_pb2.RerankRequest(query=QUERY, documents=docs(*texts))
    async with running_sidecar(model, instruction=setting) as sidecar:
        info = await sidecar.stub.Info(rerank_pb2.InfoRequest(), timeout=10)
        by_setting = await sidecar.stub.Rerank(request, timeout=30)
        request.instruction = field
        by_field = await sidecar.stub.Rerank(request, timeout=30)
    assert info.instruction == setting
    for response, instruction in ((by_setting, setting), (by_field, field)):
        scores = np.full(len(texts), np.nan)
        for result in response.results:
            scores[result.index] = result.score
        expected = qwen3_card_scores(model, QUERY, texts, instruction=instruction)
        np.testing.assert_allclose(scores, expected, atol=1e-4, rtol=0)


async def test_an_encoder_refuses_an_instruction_field(family_models: FamilyModels):
    request = rerank_pb2.RerankRequest(query=QUERY, documents=docs("a"), instruction="Find recipes")
    async with running_sidecar(family_models["bert"]) as sidecar:
        info = await sidecar.stub.Info(rerank_pb2.InfoRequest(), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await sidecar.stub.Rerank(request, timeout=30)
    assert info.instruction == ""
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reads no instruction" in (refused.value.details() or "")


async def test_a_tokenizer_process_builds_the_same_prompt_pairs(qwen3):
    pool = TokenizerPool(workers=2, processes=True)
    try:
        for spec in (PairSpec(max_length=160), PairSpec(max_length=200, chunk=True, max_chunks_per_doc=3)):
            encoder = RowEncoder(qwen3.tokenizer, spec, QUERY)
            in_process = await pool.encode(encoder, TEXTS)
            here = encoder(TEXTS)
            assert [pair.input_ids.tolist() for pair in in_process.pairs] == [p.input_ids for p in here.pairs]
            assert in_process.document_of_pair == here.document_of_pair
    finally:
        await pool.close()
