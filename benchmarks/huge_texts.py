"""Resident memory after huge documents: a sidecar's RSS after 100 requests that each carry a 1 MB
document, against its RSS after 100 ordinary requests, in the same process and run.

One sidecar subprocess (the engines benchmark's MiniLM-L6-shaped cross-encoder, torch fp32, so start-up
is quick; the engine does not touch what is measured: tokenization of the texts) serves gRPC and HTTP
on 127.0.0.1. Ordinary requests carry 20 passages of about 230 tokens; huge ones carry the same with
one passage repeated to 1 MB, truncated to the model's 512 tokens. Calls alternate between gRPC
``Rerank`` and TEI's ``POST /rerank``. Each huge request's ranking of the 1 MB document is checked to
equal that of its first 64 kB (the pairs are the same). Goal: RSS after the huge requests within 10% of
RSS after the ordinary ones.

    .venv/bin/python -m benchmarks.huge_texts [--requests 100] [--out benchmarks/out/huge_texts.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import grpc
import httpx

from benchmarks.harness import OUT, QUERY, build_model, candidates, hardware_record, start_sidecar
from client.local_sidecar import free_port
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

MEGABYTE = 1 << 20
# RSS is read this long after the last answer: past the sidecar's default --heap-trim-interval, so
# what is measured is what stays, not what the last request still holds.
SETTLE_S = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--out", type=Path, default=OUT / "huge_texts.json")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(OUT / "minilm-l6-cross-encoder")
    texts = candidates(model_dir)[:20]
    huge = (texts[0] + " ") * (MEGABYTE // (len(texts[0]) + 1))
    http_port = free_port()
    settings = {
        "engine": "torch",
        "precision": "fp32",
        "torch-compile": "off",
        "threads": "2",
        "http-port": str(http_port),
        "max-length": "512",
    }
    with (
        start_sidecar(model_dir, settings) as sidecar,
        grpc.insecure_channel(
            f"127.0.0.1:{sidecar.port}", options=[("grpc.max_send_message_length", 4 * MEGABYTE)]
        ) as channel,
        httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=600) as client,
    ):
        stub = rerank_pb2_grpc.RerankerStub(channel)

        def scores(documents: list[str], call: int) -> dict[int, float]:
            if call % 2 == 0:
                request = rerank_pb2.RerankRequest(
                    query=QUERY,
                    documents=[rerank_pb2.Document(text=text) for text in documents],
                    raw_scores=True,
                )
                return {result.index: result.score for result in stub.Rerank(request, timeout=600).results}
            response = client.post("/rerank", json={"query": QUERY, "texts": documents, "raw_scores": True})
            response.raise_for_status()
            return {rank["index"]: rank["score"] for rank in response.json()}

        for call in range(10):  # warm-up: the engine's and allocator's steady state
            scores(texts, call)
        for call in range(args.requests):
            scores(texts, call)
        time.sleep(SETTLE_S)
        ordinary_rss = sidecar.rss_bytes()
        load_before = os.getloadavg()
        expected = scores([huge[: 64 * 1024], *texts[1:]], 0)[0]
        for call in range(args.requests):
            score = scores([huge, *texts[1:]], call)[0]
            if abs(score - expected) > 1e-6:
                raise AssertionError(f"the 1 MB document scored {score}, its first 64 kB {expected}")
        time.sleep(SETTLE_S)
        huge_rss = sidecar.rss_bytes()
        load_after = os.getloadavg()
    ratio = huge_rss / ordinary_rss
    print(f"RSS after {args.requests} ordinary requests: {ordinary_rss / MEGABYTE:.0f} MiB")
    print(f"RSS after {args.requests} requests with a 1 MB document: {huge_rss / MEGABYTE:.0f} MiB")
    print(f"ratio {ratio:.3f} (goal: at most 1.10); load average {load_before} -> {load_after}")
    record = {
        "hardware": hardware_record(),
        "engine": sidecar.engine,
        "requests": args.requests,
        "ordinary_rss_bytes": ordinary_rss,
        "huge_rss_bytes": huge_rss,
        "huge_over_ordinary": ratio,
        "heap_trim_interval": os.environ.get("RERANK_HEAP_TRIM_INTERVAL", "default"),
        "load_average_before": load_before,
        "load_average_after": load_after,
    }
    args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
