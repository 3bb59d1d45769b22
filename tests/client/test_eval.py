"""``rerank-client eval``: metrics against hand-computed values, resumable ingest, and both retrievers end to
end on a small BEIR dataset (the real MiniLM embedder; the tiny random cross-encoder's quality means nothing,
so only invariants of the rerank configuration are checked)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from elasticsearch import Elasticsearch

from client.cli import main
from client.documents import Document
from client.embedding_cache import EmbeddingCache
from client.errors import InputInvalid
from client.evaluation.datasets import load_beir, prepare_index
from client.evaluation.report import lossy_embedder_warning, quality
from client.evaluation.runner import BLEND, BM25, DENSE, HYBRID, RERANK
from client.evaluation.sweep import collect_legs, grid, sweep
from client.pipeline import PipelineOptions
from client.retrieval.embedded import EmbeddedRetriever
from client.settings import EvalSettings, settings_table
from client.sidecar_client import AsyncRerankClient
from rerank.v1 import rerank_pb2
from tests.client.conftest import TOPICS, RunningEmbedder, embed_fake, synthetic_corpus
from tests.conftest import RunningSidecar

README = Path(__file__).resolve().parents[2] / "README.md"


def write_beir(directory: Path, documents: Sequence[Document], *, queries_per_topic: int = 2) -> Path:
    """A BEIR directory: the documents, queries of topic words, qrels naming some of the topic's documents."""
    directory.mkdir(parents=True)
    (directory / "qrels").mkdir()
    (directory / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n" for d in documents)
    )
    queries, qrels = [], ["query-id\tcorpus-id\tscore"]
    for topic, words in sorted(TOPICS.items()):
        for number in range(queries_per_topic):
            query_id = f"{topic}-{number}"
            queries.append({"_id": query_id, "text": " ".join(words.split()[number * 2 : number * 2 + 3])})
            relevant = [d.id for d in documents if d.metadata["topic"] == topic][number::4]
            qrels += [f"{query_id}\t{doc_id}\t1" for doc_id in relevant]
    queries.append({"_id": "unjudged", "text": "not in the qrels, so never evaluated"})
    (directory / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (directory / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")
    return directory


def eval_on_80_documents(sidecar: RunningSidecar, tmp_path: Path) -> list[str]:
    """``rerank-client eval`` flags for a BEIR directory of 80 synthetic documents, 20 candidates reranked."""
    data = write_beir(tmp_path / "data", synthetic_corpus(80))
    target = f"127.0.0.1:{sidecar.server.port}"
    return ["eval", str(data), "--target", target, "--candidates", "20", "--eval-dir", str(tmp_path / "eval")]


def test_quality_matches_hand_computed_values():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 1}, "q3": {"d4": 1}}
    rankings = {
        "q1": ["z9", "d1"],  # relevant at rank 2: NDCG 1/log2(3), RR 1/2
        "q2": ["d3", "a1", "a2"],  # one of two found at rank 1: NDCG 1/(1 + 1/log2(3)), recall 1/2
        "q3": [],  # nothing retrieved still counts, as 0
    }
    measured = quality(qrels, rankings)
    assert measured["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / (1 + 1 / math.log2(3))) / 3)
    assert measured["mrr@10"] == pytest.approx((0.5 + 1.0) / 3)
    assert measured["recall@100"] == pytest.approx((1.0 + 0.5) / 3)


def test_quality_keeps_the_given_order_of_equal_looking_ids():
    # trec_eval would reorder equal scores by id; the ranking handed in is what gets scored.
    assert quality({"q": {"a": 1}}, {"q": ["b", "a"]})["mrr@10"] == pytest.approx(0.5)
    assert quality({"q": {"b": 1}}, {"q": ["b", "a"]})["mrr@10"] == pytest.approx(1.0)


def test_quality_counts_a_repeated_document_at_its_first_rank():
    assert quality({"q": {"a": 1}}, {"q": ["a", "x", "y", "a"]}) == pytest.approx(
        {"ndcg@10": 1.0, "mrr@10": 1.0, "recall@100": 1.0}
    )
    measured = quality({"q": {"a": 1, "b": 1}}, {"q": ["x", "a", "y", "a", "b"]})  # a at 2, b at 4
    ideal = 1 + 1 / math.log2(3)
    assert measured["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / ideal)
    assert measured["mrr@10"] == pytest.approx(0.5)


def test_an_interrupted_ingest_resumes_without_re_embedding(tmp_path: Path):
    dataset = load_beir(write_beir(tmp_path / "data", synthetic_corpus(50)))
    cache_dir = tmp_path / "embeddings"
    embedded: list[str] = []

    def interrupted(texts: Sequence[str]) -> np.ndarray:
        if len(embedded) >= 20:
            raise KeyboardInterrupt  # the user presses Ctrl-C during the third batch
        embedded.extend(texts)
        return embed_fake(texts)

    with pytest.raises(KeyboardInterrupt):
        prepare_index(
            dataset,
            EmbeddedRetriever(tmp_path / "index"),
            interrupted,
            EmbeddingCache(cache_dir),
            dims=64,
            batch_size=10,
        )
    assert len(embedded) == 20

    resumed: list[str] = []

    def counting(texts: Sequence[str]) -> np.ndarray:
        resumed.extend(texts)
        return embed_fake(texts)

    retriever = EmbeddedRetriever(tmp_path / "index")
    report = prepare_index(dataset, retriever, counting, EmbeddingCache(cache_dir), dims=64, batch_size=10)
    assert report is not None
    assert report.indexed == 50
    assert len(resumed) == 30  # only what the first run had not embedded
    assert not set(resumed) & set(embedded)
    # Everything indexed: a third run neither embeds nor indexes.
    again = prepare_index(
        dataset,
        EmbeddedRetriever(tmp_path / "index"),
        counting,
        EmbeddingCache(cache_dir),
        dims=64,
        batch_size=10,
    )
    assert again is None
    assert len(resumed) == 30


def test_load_beir_keeps_judged_queries_only(tmp_path: Path):
    dataset = load_beir(write_beir(tmp_path / "data", synthetic_corpus(20)))
    assert len(dataset.queries) == 2 * len(TOPICS)
    assert "unjudged" not in dataset.queries
    with pytest.raises(InputInvalid, match=r"qrels/dev\.tsv.*pick one of test with --split"):
        load_beir(tmp_path / "data", split="dev")


async def test_eval_on_the_embedded_retriever_and_elasticsearch(
    embedding_sidecar: RunningSidecar,
    es_url: str,
    es: Elasticsearch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
):
    common = eval_on_80_documents(embedding_sidecar, tmp_path)
    embedded_json, es_json, plot = tmp_path / "embedded.json", tmp_path / "es.json", tmp_path / "chart.png"

    embedded_flags = ["--output", str(embedded_json), "--plot", str(plot), "--format", "table"]
    assert await asyncio.to_thread(main, [*common, *embedded_flags]) == 0
    table = capsys.readouterr().out
    # Float vectors in Elasticsearch (hnsw): stage 1 must rank exactly as the embedded retriever does.
    es_flags = ["--es-url", es_url, "--es-vector-index", "hnsw", "--output", str(es_json)]
    assert await asyncio.to_thread(main, [*common, *es_flags]) == 0
    printed = capsys.readouterr().out  # JSON: stdout is not a terminal

    embedded, elastic = json.loads(embedded_json.read_text()), json.loads(es_json.read_text())
    index = elastic["retriever"].removeprefix("Elasticsearch index ")
    es.options(ignore_status=404).indices.delete(index=index)
    assert index.startswith("rerank-eval-data-")
    assert embedded["retriever"] == "embedded retriever"
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "NDCG@10" in table
    assert json.loads(printed) == elastic
    for report in (embedded, elastic):
        assert (report["documents"], report["queries"], report["candidates"]) == (80, 10, 20)
        configurations = {c["key"]: c for c in report["configurations"]}
        assert list(configurations) == [BM25, DENSE, HYBRID, RERANK]
        assert "cross-encoder" in configurations[RERANK]["label"]
        assert set(configurations[RERANK]["latency_ms"]) == {"embed", "retrieval", "rerank", "total"}
        assert set(configurations[BM25]["latency_ms"]) == {"retrieval", "total"}
        # Reranking reorders the hybrid list's top 20 only, so the top 100 holds the same documents.
        assert (
            configurations[RERANK]["quality"]["recall@100"] == configurations[HYBRID]["quality"]["recall@100"]
        )
        for configuration in configurations.values():
            assert all(0.0 <= value <= 1.0 for value in configuration["quality"].values())
    for key in (BM25, DENSE, HYBRID):
        by_retriever = [
            next(c for c in report["configurations"] if c["key"] == key)["quality"]
            for report in (embedded, elastic)
        ]
        assert by_retriever[0] == pytest.approx(by_retriever[1], abs=1e-9)


def test_readme_documents_every_eval_setting():
    rows = "\n".join(settings_table(EvalSettings).splitlines()[2:])
    assert rows in README.read_text(), "README's eval settings are stale: paste `python -m client.settings`"


async def test_eval_runs_the_chosen_configurations_concurrently_and_sweeps_fusion(
    embedding_sidecar: RunningSidecar, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    report_path = tmp_path / "report.json"
    flags = eval_on_80_documents(embedding_sidecar, tmp_path)
    flags += ["--output", str(report_path), "--format", "json"]
    flags += ["--configs", "bm25,hybrid,blend", "--rerank-blend", "0.5", "--concurrency", "3", "--sweep"]
    flags += ["--num-candidates", "50"]  # above --candidates 20, below the depth of 100 eval searches
    assert await asyncio.to_thread(main, flags) == 0
    capsys.readouterr()

    report = json.loads(report_path.read_text())
    configurations = {c["key"]: c for c in report["configurations"]}
    assert list(configurations) == [BM25, HYBRID, BLEND]
    assert report["concurrency"] == 3
    assert "0.5 x rerank + 0.5 x stage 1" in configurations[BLEND]["label"]
    # The blend reorders the top 20 of the hybrid list only.
    assert configurations[BLEND]["quality"]["recall@100"] == configurations[HYBRID]["quality"]["recall@100"]
    sweep = report["sweep"]
    ndcg = [point["quality"]["ndcg@10"] for point in sweep]
    assert ndcg == sorted(ndcg, reverse=True)
    assert {point["settings"]["fusion_method"] for point in sweep} == {"rrf", "convex"}
    # The sweep's default point fuses the same hits as the hybrid configuration did.
    default = {"fusion_method": "rrf", "rank_constant": 60, "bm25_weight": 1.0, "vector_weight": 1.0}
    [same] = [point for point in sweep if point["settings"] == default]
    assert same["quality"] == pytest.approx(configurations[HYBRID]["quality"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--configs", "bm25,bm26"], "--configs takes names from bm25, dense, hybrid, rerank, blend"),
        (["--configs", "blend"], "--configs blend needs --rerank-blend"),
        (["--fusion", "elasticsearch", "--fusion-method", "convex"], "use --fusion client"),
        (["--concurrency", "0"], "--concurrency must be positive"),
    ],
)
def test_eval_refuses_unusable_configurations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
):
    data = write_beir(tmp_path / "data", synthetic_corpus(5))
    try:
        status = main(["eval", str(data), "--target", "127.0.0.1:9", *flags])
    except SystemExit as exc:  # a flag argparse refuses
        status = exc.code
    assert status == 2
    assert message in capsys.readouterr().err


def test_a_lossy_embedder_is_named():
    lossy = rerank_pb2.EmbeddingModelInfo(model_id="m", precision="int8", device="cpu")
    assert "lossy precision" in (lossy_embedder_warning(lossy) or "")
    assert lossy_embedder_warning(rerank_pb2.EmbeddingModelInfo(precision="bf16", device="cuda")) is None
    assert lossy_embedder_warning(rerank_pb2.EmbeddingModelInfo(precision="bf16", device="cpu"))


async def test_the_sweep_fuses_in_the_client_even_when_elasticsearch_fuses_the_searches(
    fake_embedder: RunningEmbedder, embedded_corpus_index: EmbeddedRetriever
):
    queries = {"brain": "brain neuron memory", "genes": "gene mutation"}
    qrels = {"brain": {"doc-0000": 1}, "genes": {"doc-0002": 1}}
    options = PipelineOptions(fusion="elasticsearch")
    async with AsyncRerankClient(fake_embedder.target) as embedder:
        legs = await collect_legs(embedded_corpus_index, embedder, options, queries, depth=50)
    points = sweep(qrels, legs)
    assert len(points) == len(grid())
    assert all(request.fusion == "client" and request.size == 50 for request, _ in legs.values())
    assert points[0].quality["ndcg@10"] >= points[-1].quality["ndcg@10"]
