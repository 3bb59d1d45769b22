"""Every reranker family served through the real sidecar ranks as its reference does, on every engine
this machine runs, in fp32: order, ids and scores within 1e-4.

Random weights: the scores check that inputs, attention, pooling and the head are right, never quality.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from rerank.v1 import rerank_pb2
from tests.conftest import ReferenceScorer, docs, running_sidecar
from tests.families.conftest import FamilyModels
from tests.families.references import (
    cross_encoder_scores,
    gemma_card_scores,
    qwen3_card_scores,
    qwen3_seq_cls_scores,
)

QUERY = "what do cats eat"
TEXTS = (
    "Cats are obligate carnivores and eat meat.",
    "The stock market fell sharply on Tuesday.",
    "Kittens need food rich in protein and fat.",
    "A recipe for vegetable soup with carrots.",
    "Basil keeps best at room temperature with its stems in a glass of water.",
    "Domestic cats are often fed dry kibble or wet food from cans, twice a day.",
)
IDS = tuple(f"doc-{index}" for index in range(len(TEXTS)))

REFERENCES: dict[str, Callable[[Path, str, tuple[str, ...]], np.ndarray]] = {
    "bert": cross_encoder_scores,
    "xlm-roberta": cross_encoder_scores,
    "electra": cross_encoder_scores,
    "deberta-v2": cross_encoder_scores,
    "modernbert": cross_encoder_scores,
    "qwen3-reranker": qwen3_card_scores,
    "qwen3-reranker-seq-cls": qwen3_seq_cls_scores,
    "bge-reranker-gemma": gemma_card_scores,
}
ENGINES = [
    "torch",
    pytest.param(
        "onnxruntime",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed"
        ),
    ),
    pytest.param(
        "openvino",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("openvino") is None, reason="openvino is not installed"
        ),
    ),
]


@pytest.fixture(scope="session")
def reference_scores(family_models: FamilyModels) -> Callable[[str], np.ndarray]:
    computed: dict[str, np.ndarray] = {}

    def scores(family: str) -> np.ndarray:
        if family not in computed:
            computed[family] = REFERENCES[family](family_models[family], QUERY, TEXTS)
        return computed[family]

    return scores


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("family", list(REFERENCES))
async def test_ranks_as_its_reference_does(
    family: str,
    engine: str,
    family_models: FamilyModels,
    family_cache: Path,
    reference_scores: Callable[[str], np.ndarray],
):
    expected = reference_scores(family)
    request = rerank_pb2.RerankRequest(query=QUERY, documents=docs(*TEXTS, ids=IDS))
    async with running_sidecar(family_models[family], engine=engine, cache_dir=str(family_cache)) as sidecar:
        info = await sidecar.stub.Info(rerank_pb2.InfoRequest(), timeout=10)
        response = await sidecar.stub.Rerank(request, timeout=60)
    assert (info.engine, info.precision) == (engine, "fp32")
    assert info.model_family == family.removesuffix("-seq-cls")
    expected_order = sorted(range(len(TEXTS)), key=lambda index: (-expected[index], index))
    assert [result.index for result in response.results] == expected_order
    assert [result.id for result in response.results] == [IDS[index] for index in expected_order]
    np.testing.assert_allclose(
        [result.score for result in response.results], expected[expected_order], atol=1e-4, rtol=0
    )
    assert np.ptp(expected) > 1e-3  # the random model separates the documents, so the order means something


@pytest.mark.parametrize("family", list(REFERENCES))
async def test_auto_loads_every_candidate_of_every_family(
    family: str, family_models: FamilyModels, family_cache: Path
):
    """Under --engine auto --precision auto no engine is skipped for failing to load: a candidate may
    fail only the parity gate (a random model's scores can move too far in bf16), with the reason kept.
    Every candidate is timed before any is gated."""
    async with running_sidecar(
        family_models[family], engine="auto", precision="auto", cache_dir=str(family_cache)
    ) as sidecar:
        info = await sidecar.stub.Info(rerank_pb2.InfoRequest(), timeout=10)
    assert [note for note in info.engine_notes if "failed to load" in note] == []
    assert info.model_family == family.removesuffix("-seq-cls")
    gated_out = {note.split(":")[0] for note in info.engine_notes if "failed the parity gate" in note}
    timed = {timing.candidate for timing in info.selection.timings}
    assert "onnxruntime/fp32" in timed | {f"{info.engine}/{info.precision}"}
    assert gated_out <= timed


ENCODERS = ["bert", "xlm-roberta", "electra", "deberta-v2", "modernbert"]
LONG_TEXTS = tuple(f"{text} " * 12 for text in TEXTS)


@pytest.mark.parametrize("family", ENCODERS)
async def test_long_documents_are_cut_as_the_tokenizer_cuts_them(family: str, family_models: FamilyModels):
    """Each encoder's pair template (XLM-R's doubled separator, DeBERTa's and ModernBERT's) survives
    truncation from either side: the sidecar scores what a transformers forward pass scores for the same
    pair truncated by the tokenizer itself."""
    reference = ReferenceScorer(family_models[family])
    async with running_sidecar(family_models[family]) as sidecar:
        for direction, side in (
            (rerank_pb2.TRUNCATION_DIRECTION_RIGHT, "right"),
            (rerank_pb2.TRUNCATION_DIRECTION_LEFT, "left"),
        ):
            request = rerank_pb2.RerankRequest(
                query=QUERY, documents=docs(*LONG_TEXTS), max_length=48, truncation_direction=direction
            )
            response = await sidecar.stub.Rerank(request, timeout=60)
            scores = np.full(len(LONG_TEXTS), np.nan)
            for result in response.results:
                scores[result.index] = result.score
            expected = reference.scores(QUERY, LONG_TEXTS, max_length=48, side=side)
            np.testing.assert_allclose(scores, expected, atol=1e-4, rtol=0)
            assert response.usage.tokens == 48 * len(LONG_TEXTS)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("family", list(REFERENCES))
async def test_tensorrt_serves_every_family(
    family: str,
    precision: str,
    family_models: FamilyModels,
    family_cache: Path,
    reference_scores: Callable[[str], np.ndarray],
):
    """On a GPU: each family's graph builds with profiles for the inputs it declares, passes the gate
    (the explicit engine would stop the start otherwise), and in fp32 ranks as the reference does."""
    from sidecar.model.engines.tensorrt_engine import unavailable_reason

    reason = unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(reason)
    request = rerank_pb2.RerankRequest(query=QUERY, documents=docs(*TEXTS, ids=IDS))
    async with running_sidecar(
        family_models[family], engine="tensorrt", precision=precision, cache_dir=str(family_cache)
    ) as sidecar:
        info = await sidecar.stub.Info(rerank_pb2.InfoRequest(), timeout=10)
        response = await sidecar.stub.Rerank(request, timeout=60)
    assert (info.engine, info.precision) == ("tensorrt", precision)
    if precision == "fp32":
        scores = np.full(len(TEXTS), np.nan)
        for result in response.results:
            scores[result.index] = result.score
        np.testing.assert_allclose(scores, reference_scores(family), atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["bert", "qwen3-reranker"])  # an encoder and a decoder
async def test_compiled_torch_serves_families_on_cuda_as_their_reference_ranks(
    family: str,
    family_models: FamilyModels,
    family_cache: Path,
    reference_scores: Callable[[str], np.ndarray],
):
    """On a GPU without TensorRT: the family compiles for the shape buckets, each captured as a CUDA
    graph, and with batches padded to buckets scores as the reference does."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    request = rerank_pb2.RerankRequest(query=QUERY, documents=docs(*TEXTS, ids=IDS))
    async with running_sidecar(
        family_models[family],
        engine="torch",
        precision="fp32",
        device="cuda",
        torch_compile="on",
        max_batch_pairs=16,
        max_batch_tokens=2048,
        cache_dir=str(family_cache),
    ) as sidecar:
        info = await sidecar.stub.Info(rerank_pb2.InfoRequest(), timeout=10)
        response = await sidecar.stub.Rerank(request, timeout=60)
    assert (info.engine, info.precision, info.device, info.compiled) == ("torch", "fp32", "cuda", True)
    scores = np.full(len(TEXTS), np.nan)
    for result in response.results:
        scores[result.index] = result.score
    np.testing.assert_allclose(scores, reference_scores(family), atol=1e-3, rtol=0)
