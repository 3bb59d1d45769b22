"""A pair budget too small for a long query: the query is cut so that every document keeps at least one
token, on every family, the decoder prompts included; a budget the prompt alone fills is refused, naming
the minimum."""

from __future__ import annotations

import grpc
import pytest

from rerank.v1 import rerank_pb2
from sidecar.errors import InvalidArgument
from sidecar.model.loading import ModelSource, load_cross_encoder
from sidecar.model.tokenization import PairSpec
from tests.conftest import docs, running_sidecar
from tests.families.conftest import BUILDERS, FamilyModels
from tests.families.test_serving import REFERENCES

LONG_QUERY = "which animals eat meat and fish every single day of the week"
DOCUMENTS = ["cats eat meat", "dogs bark loudly", "the sea is blue"]
FAMILIES = sorted({*BUILDERS, *REFERENCES})


@pytest.mark.parametrize("family", FAMILIES)
def test_the_smallest_budgets_keep_a_token_of_the_query_and_of_every_document(
    family_models: FamilyModels, family: str
):
    tokenizer = load_cross_encoder(ModelSource(str(family_models[family]))).tokenizer
    smallest = tokenizer.min_max_length()
    for max_length in range(smallest, smallest + 6):
        spec = PairSpec(max_length=max_length)
        pairs = [pair.input_ids for pair in tokenizer.encode(LONG_QUERY, DOCUMENTS, spec).pairs]
        assert all(len(pair) <= max_length for pair in pairs)
        # Documents whose first tokens differ give different pairs: each holds its document.
        assert len({tuple(pair) for pair in pairs}) == len(DOCUMENTS), max_length
        # And the query is in them: another query gives other pairs.
        other = [pair.input_ids for pair in tokenizer.encode("zebra", DOCUMENTS, spec).pairs]
        assert other != pairs, max_length


@pytest.mark.parametrize("family", ["qwen3-reranker", "bge-reranker-gemma"])
def test_a_budget_the_prompt_and_instruction_fill_is_refused_naming_the_minimum(
    family_models: FamilyModels, family: str
):
    tokenizer = load_cross_encoder(ModelSource(str(family_models[family]))).tokenizer
    long_instruction = "Judge the passage by every rule of the house style guide " * 4
    spec = PairSpec(max_length=tokenizer.min_max_length(), instruction=long_instruction)
    with pytest.raises(InvalidArgument, match=r"at least (\d+) are needed") as refused:
        tokenizer.encode(LONG_QUERY, DOCUMENTS, spec)
    minimum = int(str(refused.value).split("at least ")[1].split()[0])
    enough = PairSpec(max_length=minimum, instruction=long_instruction)
    pairs = tokenizer.encode(LONG_QUERY, DOCUMENTS, enough)
    assert all(len(pair) <= minimum for pair in pairs.pairs)
    assert len({tuple(pair.input_ids) for pair in pairs.pairs}) == len(DOCUMENTS)


@pytest.mark.parametrize("family", ["bert", "qwen3-reranker"])
async def test_documents_do_not_tie_at_the_smallest_max_length(family_models: FamilyModels, family: str):
    async with running_sidecar(family_models[family]) as sidecar:
        smallest = sidecar.server.core.reranker.model.tokenizer.min_max_length()  # type: ignore[union-attr]
        request = rerank_pb2.RerankRequest(
            query=LONG_QUERY, documents=docs(*DOCUMENTS), max_length=smallest, raw_scores=True
        )
        response = await sidecar.stub.Rerank(request, timeout=60)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await sidecar.stub.Rerank(
                rerank_pb2.RerankRequest(query=LONG_QUERY, documents=docs("a"), max_length=smallest - 1),
                timeout=60,
            )
    assert len({result.score for result in response.results}) == len(DOCUMENTS)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at least {smallest}" in (refused.value.details() or "")
