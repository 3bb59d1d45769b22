"""HTTP/JSON against gRPC: the latency of one 100-candidate rerank through each transport of one sidecar.

The workload is the engines benchmark's (one query, 100 candidates of about 230 tokens, max_length
256) against its MiniLM-L6-shaped model. One sidecar subprocess serves both transports on 127.0.0.1;
one caller at a time sends the same request as gRPC ``Rerank``, as Cohere's ``POST /v2/rerank`` and as
TEI's ``POST /rerank`` (httpx, one kept-alive connection), round-robin, one call each per round, so
load from other processes falls on all alike. Figures are medians of ``--repeats`` rounds after a
warm-up; ratios are against gRPC in the same run. Every variant's ranking is checked to equal gRPC's.

    .venv/bin/python -m benchmarks.http_vs_grpc [--repeats 40] [--engine auto] \
        [--out benchmarks/out/http_vs_grpc.json]
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np

from benchmarks.harness import (
    OUT,
    QUERY,
    Run,
    build_model,
    candidates,
    hardware_record,
    interleaved,
    start_sidecar,
)
from client.local_sidecar import free_port
from rerank.v1 import rerank_pb2, rerank_pb2_grpc


@dataclass
class Variant:
    transport: str
    median_ms: float
    vs_grpc: float


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", default="2")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", type=Path, default=OUT / "http_vs_grpc.json")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(OUT / "minilm-l6-cross-encoder")
    texts = candidates(model_dir)
    http_port = free_port()
    settings = {
        "engine": args.engine,
        "precision": args.precision,
        "threads": args.threads,
        "http-port": str(http_port),
    }
    grpc_request = rerank_pb2.RerankRequest(
        query=QUERY,
        documents=[rerank_pb2.Document(text=text) for text in texts],
        max_length=args.max_length,
    )
    # Cohere's per-document cap of max_length tokens is the same pair budget as gRPC's max_length.
    cohere_body = {"model": "any", "query": QUERY, "documents": texts, "max_tokens_per_doc": args.max_length}
    with (
        start_sidecar(model_dir, settings) as sidecar,
        grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel,
        httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=600) as client,
    ):
        stub = rerank_pb2_grpc.RerankerStub(channel)

        def over_grpc() -> np.ndarray:
            return np.array([result.index for result in stub.Rerank(grpc_request, timeout=600).results])

        def over_cohere() -> np.ndarray:
            response = client.post("/v2/rerank", json=cohere_body)
            response.raise_for_status()
            return np.array([result["index"] for result in response.json()["results"]])

        def over_tei() -> np.ndarray:
            # TEI has no pair budget: it uses the model's limit, which these pairs stay under.
            response = client.post("/rerank", json={"query": QUERY, "texts": texts})
            response.raise_for_status()
            return np.array([rank["index"] for rank in response.json()])

        runs = {
            "grpc Rerank": Run(len(texts), over_grpc),
            "http POST /v2/rerank": Run(len(texts), over_cohere),
            "http POST /rerank": Run(len(texts), over_tei),
        }
        load_before = os.getloadavg()
        measured = interleaved(runs, args.repeats)
        load_after = os.getloadavg()
    for name, (_, order) in measured.items():
        if not np.array_equal(order, measured["grpc Rerank"][1]):
            raise AssertionError(f"{name} ranks the candidates differently from gRPC")
    baseline = measured["grpc Rerank"][0]
    variants = [
        Variant(transport=name, median_ms=1e3 * seconds, vs_grpc=seconds / baseline)
        for name, (seconds, _) in measured.items()
    ]
    print(f"sidecar {sidecar.engine}, {len(texts)} candidates, max_length {args.max_length}")
    print(f"{args.repeats} rounds; medians")
    print("| transport | median ms | vs gRPC |")
    print("|---|---|---|")
    for variant in variants:
        print(f"| {variant.transport} | {variant.median_ms:.1f} | {variant.vs_grpc:.3f}x |")
    record = {
        "hardware": hardware_record(),
        "engine": sidecar.engine,
        # The machine's 1, 5 and 15-minute load averages around the rounds: how quiet it was.
        "load_average_before": load_before,
        "load_average_after": load_after,
        "repeats": args.repeats,
        "max_length": args.max_length,
        "variants": [asdict(variant) for variant in variants],
    }
    args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
