"""Rerank end to end through a real gRPC server on 127.0.0.1: scores, ordering and options."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from rerank.v1 import rerank_pb2
from tests.conftest import ReferenceScorer, RunningSidecar, docs, running_sidecar, wait_until
from tests.models import save_tiny_roberta

QUERY = "what do cats eat"
TEXTS = (
    "Cats are obligate carnivores and eat meat.",
    "The stock market fell sharply on Tuesday.",
    "Kittens need food rich in protein and fat.",
    "A recipe for vegetable soup with carrots.",
    "",
    "Domestic cats are often fed dry kibble or wet food from cans, twice a day.",
)


async def rerank(sidecar: RunningSidecar, **fields: object) -> rerank_pb2.RerankResponse:
    request = rerank_pb2.RerankRequest(query=QUERY, documents=docs(*TEXTS), **fields)  # type: ignore[arg-type]
    return await sidecar.stub.Rerank(request, timeout=30)


def by_index(response: rerank_pb2.RerankResponse) -> np.ndarray:
    scores = np.full(len(TEXTS), np.nan)
    for result in response.results:
        scores[result.index] = result.score
    return scores


async def test_scores_equal_a_direct_transformers_forward(
    sidecar: RunningSidecar, reference: ReferenceScorer
):
    response = await rerank(sidecar)
    np.testing.assert_allclose(by_index(response), reference.scores(QUERY, TEXTS), atol=1e-5, rtol=0)


async def test_batch_workers_side_by_side_score_like_one(tiny_bert: Path, reference: ReferenceScorer):
    texts = [f"{text} (copy {copy})" for copy in range(6) for text in TEXTS]
    request = rerank_pb2.RerankRequest(query=QUERY, documents=docs(*texts), max_length=24)
    async with running_sidecar(tiny_bert, batch_workers=2, max_batch_pairs=4) as sidecar:
        info = await sidecar.stub.Info(rerank_pb2.InfoRequest(), timeout=10)
        responses = await asyncio.gather(*(sidecar.stub.Rerank(request, timeout=30) for _ in range(3)))
    assert info.limits.batch_workers == 2
    expected = reference.scores(QUERY, texts, max_length=24)
    for response in responses:
        assert response.usage.batches >= 9  # 36 pairs, at most 4 a batch
        scores = np.full(len(texts), np.nan)
        for result in response.results:
            scores[result.index] = result.score
        np.testing.assert_allclose(scores, expected, atol=1e-5, rtol=0)


async def test_raw_scores_are_the_logits(sidecar: RunningSidecar, reference: ReferenceScorer):
    response = await rerank(sidecar, raw_scores=True)
    np.testing.assert_allclose(by_index(response), reference.logits(QUERY, TEXTS)[:, 0], atol=1e-5, rtol=0)


async def test_two_label_model_uses_the_positive_class(
    sidecar_two_labels: RunningSidecar, reference_two_labels: ReferenceScorer
):
    normalized = await rerank(sidecar_two_labels)
    np.testing.assert_allclose(
        by_index(normalized), reference_two_labels.scores(QUERY, TEXTS), atol=1e-5, rtol=0
    )
    raw = await rerank(sidecar_two_labels, raw_scores=True)
    logits = reference_two_labels.logits(QUERY, TEXTS)
    np.testing.assert_allclose(by_index(raw), logits[:, 1] - logits[:, 0], atol=1e-5, rtol=0)


async def test_results_are_sorted_descending_and_carry_ids(sidecar: RunningSidecar):
    response = await rerank(sidecar)
    scores = [result.score for result in response.results]
    assert scores == sorted(scores, reverse=True)
    assert sorted(result.index for result in response.results) == list(range(len(TEXTS)))
    assert all(result.id == f"doc-{result.index}" for result in response.results)
    assert all(not result.HasField("text") for result in response.results)
    assert response.model_id == Path(sidecar.server.settings.model).name


async def test_ties_are_broken_by_index(sidecar: RunningSidecar):
    same = "identical text in every document"
    request = rerank_pb2.RerankRequest(query=QUERY, documents=docs(same, "something else", same, same))
    response = await sidecar.stub.Rerank(request, timeout=30)
    tied = [result.index for result in response.results if result.index != 1]
    assert tied == [0, 2, 3]
    assert len({result.score for result in response.results if result.index != 1}) == 1


async def test_top_n_keeps_the_best(sidecar: RunningSidecar):
    everything = await rerank(sidecar)
    top = await rerank(sidecar, top_n=2)
    assert [r.index for r in top.results] == [r.index for r in everything.results[:2]]
    assert top.usage.pairs == len(TEXTS)
    more_than_sent = await rerank(sidecar, top_n=100)
    assert len(more_than_sent.results) == len(TEXTS)


async def test_return_text_echoes_each_document(sidecar: RunningSidecar):
    response = await rerank(sidecar, return_text=True)
    assert all(result.HasField("text") and result.text == TEXTS[result.index] for result in response.results)


async def test_max_length_truncates_documents(sidecar: RunningSidecar, reference: ReferenceScorer):
    response = await rerank(sidecar, max_length=12)
    np.testing.assert_allclose(
        by_index(response), reference.scores(QUERY, TEXTS, max_length=12), atol=1e-5, rtol=0
    )


async def test_left_truncation_keeps_the_end(sidecar: RunningSidecar, reference: ReferenceScorer):
    response = await rerank(sidecar, max_length=12, truncation_direction=rerank_pb2.TRUNCATION_DIRECTION_LEFT)
    expected = reference.scores(QUERY, TEXTS, max_length=12, side="left")
    np.testing.assert_allclose(by_index(response), expected, atol=1e-5, rtol=0)
    right = await rerank(sidecar, max_length=12)
    assert not np.allclose(by_index(response), by_index(right))


async def test_usage_reports_the_work(sidecar: RunningSidecar):
    response = await rerank(sidecar)
    usage = response.usage
    assert usage.pairs == usage.chunks == len(TEXTS)
    assert usage.tokens > len(TEXTS) * 3
    assert usage.batches >= 1
    assert usage.inference_ns > 0
    assert usage.tokenization_ns > 0
    assert usage.total_ns >= usage.inference_ns + usage.tokenization_ns


async def test_concurrent_callers_each_get_their_own_results_from_merged_batches(
    sidecar: RunningSidecar, reference: ReferenceScorer
):
    callers = 32
    queries = [f"question number {i} about topic {i * 7}" for i in range(callers)]
    documents = [
        [f"passage {i}-{j} on subject {(i * j) % 11}" for j in range(3 + i % 5)] for i in range(callers)
    ]
    engine = sidecar.engine
    engine.open.clear()  # hold the model so every caller's pairs are queued together
    batches_before = len(engine.batches)
    calls = [  # a grpc.aio call starts when it is created
        sidecar.stub.Rerank(rerank_pb2.RerankRequest(query=q, documents=docs(*d)), timeout=60)
        for q, d in zip(queries, documents, strict=True)
    ]
    try:
        total_pairs = sum(len(d) for d in documents)
        batcher = sidecar.server.core.reranker.batcher  # type: ignore[union-attr]
        await wait_until(lambda: batcher.queued_pairs + batcher.limits.max_batch_pairs >= total_pairs)
    finally:
        engine.open.set()
    responses = await asyncio.gather(*calls)
    for query, texts, response in zip(queries, documents, responses, strict=True):
        got = np.array([result.score for result in sorted(response.results, key=lambda r: r.index)])
        np.testing.assert_allclose(got, reference.scores(query, texts), atol=1e-5, rtol=0)
    model_calls = len(engine.batches) - batches_before
    assert model_calls < callers
    assert any(response.usage.batches >= 1 for response in responses)


@pytest.mark.parametrize("overlap", [0, 4])
async def test_chunking_scores_a_document_by_its_best_chunk(
    sidecar: RunningSidecar, reference: ReferenceScorer, overlap: int
):
    tokenizer = reference.tokenizer
    words = [w for w in ("river", "mountain", "table", "window", "garden", "yellow", "music", "winter")]
    filler = " ".join(words[i % len(words)] for i in range(120))
    tail = "cats eat fish and chicken every day"
    document = f"{filler} {tail}"
    max_length = 32
    query_ids = tokenizer(QUERY, add_special_tokens=False)["input_ids"]
    doc_ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    assert len(doc_ids) == 120 + len(tail.split())  # one token per word keeps chunk texts exact
    chunk_length = max_length - 3 - len(query_ids)
    step = chunk_length - overlap
    starts = range(0, len(doc_ids) - overlap, step)
    chunks = [doc_ids[start : start + chunk_length] for start in starts]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    chunk_logits = [reference.ids_logits([cls, *query_ids, sep, *chunk, sep])[0] for chunk in chunks]

    request = rerank_pb2.RerankRequest(
        query=QUERY,
        documents=docs(document),
        max_length=max_length,
        long_documents=rerank_pb2.LONG_DOCUMENTS_CHUNK,
        chunk_overlap=overlap,
        raw_scores=True,
    )
    response = await sidecar.stub.Rerank(request, timeout=30)
    assert response.usage.chunks == len(chunks)
    assert response.results[0].score == pytest.approx(max(chunk_logits), abs=1e-5)

    best_chunk_text = tokenizer.decode(chunks[int(np.argmax(chunk_logits))])
    alone = await sidecar.stub.Rerank(
        rerank_pb2.RerankRequest(
            query=QUERY, documents=docs(best_chunk_text), max_length=max_length, raw_scores=True
        ),
        timeout=30,
    )
    assert alone.results[0].score == pytest.approx(response.results[0].score, abs=1e-5)


async def test_chunking_respects_max_chunks_per_doc(sidecar: RunningSidecar):
    document = " ".join(["river"] * 400)
    request = rerank_pb2.RerankRequest(
        query=QUERY,
        documents=docs(document, "short"),
        max_length=32,
        long_documents=rerank_pb2.LONG_DOCUMENTS_CHUNK,
        max_chunks_per_doc=3,
    )
    response = await sidecar.stub.Rerank(request, timeout=30)
    assert response.usage.chunks == 3 + 1
    assert response.usage.pairs == 2


async def test_info_describes_the_model_and_limits(sidecar: RunningSidecar):
    info = await sidecar.stub.Info(rerank_pb2.InfoRequest(), timeout=10)
    assert info.model_id == Path(sidecar.server.settings.model).name
    assert info.model_kind == "cross-encoder"
    assert info.engine == "torch"
    assert info.precision == "fp32"
    assert info.device == "cpu"
    assert not info.compiled  # torch, with --torch-compile off in the test sidecar
    assert info.max_length == 512
    assert info.num_labels == 1
    assert info.limits.max_batch_pairs == 32  # the CPU's default, since none was set
    assert info.limits.max_batch_tokens == 4096  # the CPU's default budget, since none was set
    assert info.limits.batch_workers == 1  # as the test sidecar asks
    assert info.limits.max_documents_per_request == sidecar.server.settings.max_documents_per_request
    assert info.server_version


async def test_roberta_family_model_without_token_type_ids(tmp_path):
    model_dir = save_tiny_roberta(tmp_path / "tiny-roberta")
    reference = ReferenceScorer(model_dir)
    async with running_sidecar(model_dir) as running:
        response = await running.stub.Rerank(
            rerank_pb2.RerankRequest(query=QUERY, documents=docs(*TEXTS)), timeout=30
        )
        info = await running.stub.Info(rerank_pb2.InfoRequest(), timeout=10)
        batch = running.engine.batches[-1]
    np.testing.assert_allclose(by_index(response), reference.scores(QUERY, TEXTS), atol=1e-5, rtol=0)
    assert batch.token_type_ids is None
    assert info.max_length == 512  # 514 positions, two taken by the padding offset
