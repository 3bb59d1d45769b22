"""How closely each lossy OpenVINO model the sidecar may serve agrees with fp32, over many queries.

The parity gate judges a candidate on one probe at start; this measures the same agreement on real
text, per query, for the default pair of models: the engines benchmark's MiniLM-L6 cross-encoder (real
encoder weights, a seeded random head, so agreement and never quality) and the packaged
all-MiniLM-L6-v2 embedder. Query i of SciFact's queries is scored against the corpus abstracts
i x D to (i + 1) x D - 1 (max_length 256): the cross-encoder's normalized score of each pair, the
embedder's cosine of the two embeddings. Against torch fp32 it reports, over the queries: the median,
mean and lowest Spearman of a query's scores, the mean and lowest count of fp32's top 10 kept in the
top 10, how many queries kept fewer than 9 (the gate's limit), and the largest change of a score.
Static int8 is calibrated on the packaged pairs, as the sidecar does by default.

    .venv/bin/python -m benchmarks.agreement [--queries 50] [--documents 100] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness import (
    OUT,
    corpus_texts,
    default_pair_openvino_models,
    hardware_record,
    scifact_queries,
)

_BATCH_ROWS = 16


def main() -> None:
    from sidecar.model.engines.openvino_engine import OpenVinoEngine
    from sidecar.model.engines.torch_engine import TorchEngine

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--documents", type=int, default=100, help="abstracts scored for each query")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    queries = scifact_queries()[: args.queries]
    documents = corpus_texts()[: len(queries) * args.documents]
    if not queries or len(documents) < len(queries) * args.documents:
        raise SystemExit("SciFact (../shared/data/scifact) is needed, with enough abstracts")
    rows: list[dict[str, Any]] = []
    print(
        "| model | candidate | Spearman median | mean | lowest | top-10 kept mean | lowest | queries under 9 "
        "| max abs |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for models in default_pair_openvino_models(OUT / "cache"):
        model = models.model
        score = _cross_encoder_scores if models.kind == "cross-encoder" else _embedder_scores
        reference = score(
            TorchEngine(models.network, precision="fp32"), model, queries, documents, args.documents
        )
        for label, (precision, path) in models.candidates.items():
            engine = OpenVinoEngine(
                models.exported,
                models.cache,
                precision=precision,
                device="cpu",
                threads=1,
                workers=2,
                model=path,
            )
            scores = score(engine, model, queries, documents, args.documents)
            engine.close()
            row = {"model": models.kind, "candidate": label, **_agreement(scores, reference)}
            rows.append(row)
            print(
                f"| {models.kind} | {label} | {row['spearman_median']:.5f} | {row['spearman_mean']:.5f} | "
                f"{row['spearman_lowest']:.4f} | {row['top10_kept_mean']:.2f} | {row['top10_kept_lowest']} | "
                f"{row['queries_under_9']} of {len(queries)} | {row['max_abs']:.3f} |",
                flush=True,
            )
    hardware = hardware_record()
    print(f"hardware: {hardware['cpu']} ({hardware['isa_class']})")
    if args.out is not None:
        settings = {"queries": len(queries), "documents": args.documents}
        args.out.write_text(json.dumps({"hardware": hardware, **settings, "rows": rows}, indent=2))


def _cross_encoder_scores(
    engine: Any, model: Any, queries: list[str], documents: list[str], per_query: int
) -> np.ndarray:
    from sidecar.model.kinds import kind_of
    from sidecar.model.tokenization import PairSpec

    pairs = [
        pair
        for index, query in enumerate(queries)
        for pair in model.tokenizer.encode(
            query, documents[index * per_query : (index + 1) * per_query], PairSpec(max_length=256)
        ).pairs
    ]

    def to_scores(outputs: np.ndarray) -> np.ndarray:  # as the sidecar scores a pair
        kind = kind_of(model)
        return kind.normalize(kind.raw_scores(model, outputs)).reshape(len(queries), per_query)

    return _probe(model, pairs, to_scores).scores(engine)


def _embedder_scores(
    engine: Any, model: Any, queries: list[str], documents: list[str], per_query: int
) -> np.ndarray:
    from sidecar.model.kinds import unit_vectors
    from sidecar.model.tokenization import PairSpec

    rows = model.tokenizer.encode_texts([*queries, *documents], PairSpec(max_length=256)).pairs

    def to_scores(embeddings: np.ndarray) -> np.ndarray:
        unit = unit_vectors(embeddings)
        query_units = unit[: len(queries)]
        document_units = unit[len(queries) :].reshape(len(queries), per_query, -1)
        return np.einsum("qd,qnd->qn", query_units, document_units)

    return _probe(model, rows, to_scores).scores(engine)


def _probe(model: Any, rows: list[Any], to_scores: Callable[[np.ndarray], np.ndarray]) -> Any:
    """The rows batched in order of length, as the batcher would."""
    from sidecar.model.parity import length_sorted_probe

    return length_sorted_probe(rows, model.pad_token_id, model.uses_token_type_ids, _BATCH_ROWS, to_scores)


def _agreement(scores: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    from sidecar.model.parity import spearman, top_kept

    rank = [spearman(scores[query], reference[query]) for query in range(len(scores))]
    kept = [top_kept(scores[query], reference[query]) for query in range(len(scores))]
    return {
        "spearman_median": float(np.median(rank)),
        "spearman_mean": float(np.mean(rank)),
        "spearman_lowest": float(np.min(rank)),
        "top10_kept_mean": float(np.mean(kept)),
        "top10_kept_lowest": int(min(kept)),
        "queries_under_9": int(sum(count < 9 for count in kept)),
        "max_abs": float(np.abs(scores - reference).max()),
    }


if __name__ == "__main__":
    main()
