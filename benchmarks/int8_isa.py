"""Whether OpenVINO's static int8 pays on an x86 CPU without int8 dot products (VNNI), on any x86 CPU.

oneDNN, inside OpenVINO's CPU plugin, honours ``ONEDNN_MAX_CPU_ISA``: capped at ``AVX2`` it uses only
the kernels an AVX2 CPU without VNNI has. Each OpenVINO model of the engines benchmark's cross-encoder
(the fp32 export, and static int8's two models) is compiled and timed in a child process of its own,
once with the CPU's own ISA and once under each cap given, on batches of 16 of the workload's pairs
(about 230 tokens each, max_length 256), 2 threads, the rest of the graph in fp32. Besides the time it
reports the kernels OpenVINO picked for the matrix products, which say why int8 is fast or slow.

What a cap cannot change: OpenVINO's fp32 matrix products run on MLAS, which reads the CPU's features
itself, so under a cap fp32 keeps the real CPU's widest vectors (on AMD Zen 4, whose AVX-512 units are
256 bits wide, that is close to AVX2's speed). A cap emulates an ISA, not another CPU: its figures are a
lead, and the CPU class itself has the last word.

    .venv/bin/python -m benchmarks.int8_isa [--caps AVX2] [--repeats 10] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import OUT, QUERY, candidates, default_pair_openvino_models, hardware_record

_BATCH_ROWS = 16
_THREADS = 2


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--caps", nargs="*", default=["AVX2"], help="ONEDNN_MAX_CPU_ISA values to time under")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_time_model(Path(args.child[0]), Path(args.child[1]), args.repeats)))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    from sidecar.model.batch import collate
    from sidecar.model.tokenization import PairSpec

    models = next(default_pair_openvino_models(OUT / "cache"))  # the cross-encoder
    model = models.model
    texts = candidates(OUT / "minilm-l6-cross-encoder")
    pairs = model.tokenizer.encode(QUERY, texts, PairSpec(max_length=256)).pairs
    batch = collate(pairs[:_BATCH_ROWS], model.pad_token_id, model.uses_token_type_ids)
    batch_file = OUT / "int8-isa-batch.npz"
    np.savez(batch_file, **batch.as_dict())
    variants = {
        "openvino/fp32": models.exported.path,
        **{label: path for label, (precision, path) in models.candidates.items() if precision == "int8"},
    }
    rows: list[dict[str, Any]] = []
    print("| ISA | model | ms per batch of 16 | vs fp32 | matrix-product kernels |")
    print("|---|---|---|---|---|")
    for cap in ["native", *args.caps]:
        environment = {key: value for key, value in os.environ.items() if key != "ONEDNN_MAX_CPU_ISA"}
        if cap != "native":
            environment["ONEDNN_MAX_CPU_ISA"] = cap
        fp32_ms = 0.0
        for label, path in variants.items():
            command = [sys.executable, "-m", "benchmarks.int8_isa", "--repeats", str(args.repeats)]
            done = subprocess.run(
                [*command, "--child", str(path), str(batch_file)],
                env=environment,
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:  # OpenVINO has no kernel for some node under this cap
                failure = _openvino_reason(done.stderr)
                rows.append({"isa": cap, "model": label, "failed": failure})
                print(f"| {cap} | {label} | failed | | {failure} |", flush=True)
                continue
            timed = json.loads(done.stdout.strip().splitlines()[-1])
            fp32_ms = fp32_ms or timed["ms_per_batch"]
            row = {"isa": cap, "model": label, **timed, "vs_fp32": fp32_ms / timed["ms_per_batch"]}
            rows.append(row)
            kernels = ", ".join(f"{count} {kind}" for kind, count in timed["kernels"].items())
            speed = f"{timed['ms_per_batch']:.0f} | {row['vs_fp32']:.2f}x"
            print(f"| {cap} | {label} | {speed} | {kernels} |", flush=True)
    hardware = hardware_record()
    print(f"hardware: {hardware['cpu']} ({hardware['isa_class']})")
    if args.out is not None:
        settings = {"batch_rows": _BATCH_ROWS, "threads": _THREADS, "repeats": args.repeats}
        args.out.write_text(json.dumps({"hardware": hardware, **settings, "rows": rows}, indent=2))


def _openvino_reason(stderr: str) -> str:
    """The line of a child's traceback that says why OpenVINO failed (its first lines name sources)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    reasons = [line for line in lines if line.startswith("[CPU]") or "primitive" in line]
    return (reasons or lines or ["no output"])[-1]


def _time_model(model: Path, batch_file: Path, repeats: int) -> dict[str, Any]:
    """The model compiled for this process's ISA: median ms per batch, and the kernels of its matrix
    products (OpenVINO names them once a batch has run)."""
    import openvino

    core = openvino.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": _THREADS}
    compiled = core.compile_model(core.read_model(str(model)), "CPU", config)
    request = compiled.create_infer_request()
    names = {port.get_any_name() for port in compiled.inputs}
    batch = {name: array for name, array in np.load(batch_file).items() if name in names}
    request.infer(batch)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        request.infer(batch)
        seconds.append(time.perf_counter() - started)
    kernels: collections.Counter[str] = collections.Counter()
    for op in request.get_compiled_model().get_runtime_model().get_ops():
        info = {key: value.astype(str) for key, value in op.get_rt_info().items()}
        if info.get("layerType") in ("FullyConnected", "MatMul"):
            kernels[f"{info.get('primitiveType')}"] += 1
    return {"ms_per_batch": 1000 * statistics.median(seconds), "kernels": dict(kernels.most_common())}


if __name__ == "__main__":
    main()
