"""What each OpenVINO model the sidecar may serve holds in memory once compiled, and after batches.

For the default pair of models (the engines benchmark's MiniLM-L6 cross-encoder and the packaged
all-MiniLM-L6-v2 embedder), each OpenVINO model the selection can build here: bf16 (weights stored in
fp16) and static int8's two models, calibrated on the packaged pairs. Every measurement runs in a fresh
process that imports neither torch nor the model, as a warm start serves: it loads the compiled blob
the way the server does (the blob is compiled and cached by a first process, not measured), with the
server's layout on 2 cores (2 streams of 1 thread), then runs one batch of 8 x 256 tokens (the engine's
preferred 2,048 tokens) on each stream at once, twice. It reports the resident memory the engine added
after loading and after the batches (medians of the repeats).

    .venv/bin/python -m benchmarks.openvino_memory [--repeats 3] [--out benchmarks/out/openvino-memory.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

_ROWS, _TOKENS = 8, 256


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child's job, as JSON
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(_measure(json.loads(args.measure))))
        return
    _compare(args.repeats, args.out)


def _compare(repeats: int, out: Path | None) -> None:
    from benchmarks.harness import OUT, default_pair_openvino_models, hardware_record

    OUT.mkdir(parents=True, exist_ok=True)
    cache_dir = OUT / "cache"
    rows = []
    print("| model | candidate | MB once loaded | MB after the batches |")
    print("|---|---|---|---|")
    for models in default_pair_openvino_models(cache_dir):
        exported = models.exported
        for label, (precision, path) in models.candidates.items():
            job = {
                "cache": str(cache_dir),
                "model": str(path),
                "precision": precision,
                "exported": {**dataclasses.asdict(exported), "path": str(exported.path)},
            }
            _child(job)  # compiles and caches the blob, as the selection's child does
            runs = [_child(job) for _ in range(repeats)]
            row = {
                "model": models.kind,
                "candidate": label,
                "loaded_mb": statistics.median(run["loaded_mb"] for run in runs),
                "after_batches_mb": statistics.median(run["after_batches_mb"] for run in runs),
                "runs": runs,
            }
            rows.append(row)
            print(
                f"| {models.kind} | {label} | {row['loaded_mb']:.0f} | {row['after_batches_mb']:.0f} |",
                flush=True,
            )
    hardware = hardware_record()
    print(f"hardware: {hardware['cpu']} ({hardware['isa_class']})")
    if out is not None:
        out.write_text(json.dumps({"hardware": hardware, "repeats": repeats, "rows": rows}, indent=2))


def _child(job: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.openvino_memory", "--measure", json.dumps(job)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure(job: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: the engine's resident memory once loaded and after a batch on each stream."""
    import numpy as np

    from sidecar.model.batch import EncodedPair, collate
    from sidecar.model.cache import ArtifactCache
    from sidecar.model.engines.openvino_engine import OpenVinoEngine
    from sidecar.model.export import ExportedModel

    fields = job["exported"]
    exported = ExportedModel(
        **{**fields, "path": Path(fields["path"]), "input_names": tuple(fields["input_names"])}
    )
    cache = ArtifactCache(Path(job["cache"]))
    rng = np.random.default_rng(0)
    with_token_types = "token_type_ids" in exported.input_names
    pairs = [
        EncodedPair(
            input_ids=[101, *rng.integers(1000, 20000, _TOKENS - 2).tolist(), 102],
            token_type_ids=[0] * _TOKENS,
        )
        for _ in range(_ROWS)
    ]
    batch = collate(pairs, 0, with_token_types)
    before = _resident_mb()
    engine = OpenVinoEngine(
        exported,
        cache,
        precision=job["precision"],
        device="cpu",
        threads=1,
        workers=2,
        model=Path(job["model"]),
    )
    loaded = _resident_mb()
    for _ in range(2):
        streams = [threading.Thread(target=engine.forward, args=(batch,)) for _ in range(2)]
        for stream in streams:
            stream.start()
        for stream in streams:
            stream.join()
    after = _resident_mb()
    return {"loaded_mb": loaded - before, "after_batches_mb": after - before}


def _resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


if __name__ == "__main__":
    main()
