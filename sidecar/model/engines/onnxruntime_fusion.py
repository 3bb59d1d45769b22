"""ONNX Runtime's BERT fusion of an exported graph, run as a process of its own for a large export.

``onnxruntime.transformers`` copies the whole model, weights and all, for each of its several shape
inferences, and the memory it frees stays with the process: on a base-sized model it peaked near eight
times the export's size (benchmarks/RESULTS.md, "Start-up to SERVING and memory"). Here the weights move
to a scratch file first, so the fusion works on the graph and reads from that file only the few tensors
it merges; they come back into the fused file at the end. The scratch directory is this process's
working directory, where ONNX resolves external data, which is why the work has a process of its own.
A small export (``IN_PROCESS_BYTES``) is fused in the caller's process, as the library does it: its
copies are small, and a process of its own would cost the start its interpreter and imports.

Run by ``fuse_in_subprocess`` as ``python -m sidecar.model.engines.onnxruntime_fusion EXPORT TARGET
NUM_HEADS HIDDEN_SIZE {cpu,gpu}``; it prints the fused operators' counts as JSON on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sidecar.errors import ModelLoadError

# Tensors at least this large move to the scratch file; smaller ones (shapes, scalars) stay in the
# graph, where shape inference reads their values.
_EXTERNAL_BYTES = 1024
_WEIGHTS_FILE = "weights.bin"
# The largest export fused in the caller's process; MiniLM's is 87 MB, a base-sized model's 1.1 GB.
IN_PROCESS_BYTES = 256 << 20


def fuse_export(
    export: Path, target: Path, num_heads: int, hidden_size: int, use_gpu: bool
) -> dict[str, int]:
    """Writes the fused graph of ``export`` to ``target``, in this process for an export of at most
    ``IN_PROCESS_BYTES`` (with its weights files), else in a process of its own; returns how many of each
    operator it fused. A fusion that fails raises a ModelLoadError naming the file."""
    size = sum(path.stat().st_size for path in export.parent.iterdir() if path.is_file())
    if size > IN_PROCESS_BYTES:
        return fuse_in_subprocess(export, target, num_heads, hidden_size, use_gpu)
    try:
        model = _bert_fusion(str(export), num_heads, hidden_size, use_gpu)
        model.save_model_to_file(str(target))
    except Exception as exc:  # the library raises whatever its passes raise
        failure = f"{type(exc).__name__}: {exc}"
        raise ModelLoadError(f"ONNX Runtime's fusion of {export} failed: {failure}") from exc
    return _fused_operators(model)


def fuse_in_subprocess(
    export: Path, target: Path, num_heads: int, hidden_size: int, use_gpu: bool
) -> dict[str, int]:
    """Writes the fused graph of ``export`` to ``target``; returns how many of each operator it fused.

    A fusion that fails raises a ModelLoadError with the end of what the process wrote.
    """
    command = [
        sys.executable,
        "-m",
        __name__,
        str(export.resolve()),
        str(target.resolve()),
        str(num_heads),
        str(hidden_size),
        "gpu" if use_gpu else "cpu",
    ]
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        tail = " | ".join(finished.stderr.strip().splitlines()[-5:])
        raise ModelLoadError(
            f"ONNX Runtime's fusion of {export} failed (exit status {finished.returncode}): {tail}"
        )
    return {name: int(count) for name, count in json.loads(finished.stdout.strip().splitlines()[-1]).items()}


def fuse(export: Path, target: Path, num_heads: int, hidden_size: int, use_gpu: bool) -> dict[str, int]:
    """The fusion itself; changes the working directory, so only for a process of its own."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    with tempfile.TemporaryDirectory(prefix=".fusion-", dir=target.parent) as scratch:
        graph_path = Path(scratch) / "graph.onnx"
        onnx.save_model(
            onnx.load(str(export)),
            str(graph_path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=_WEIGHTS_FILE,
            size_threshold=_EXTERNAL_BYTES,
        )
        graph = onnx.load(str(graph_path), load_external_data=False)
        os.chdir(scratch)
        model = _bert_fusion(graph, num_heads, hidden_size, use_gpu)
        load_external_data_for_model(model.model, scratch)
        model.save_model_to_file(str(target))
    return _fused_operators(model)


def _bert_fusion(model: Any, num_heads: int, hidden_size: int, use_gpu: bool) -> Any:
    """The library's BERT fusion of ``model`` (a path or a ModelProto), as an ``OnnxModel``."""
    from onnxruntime.transformers import optimizer

    return optimizer.optimize_model(
        model,
        model_type="bert",
        num_heads=num_heads,
        hidden_size=hidden_size,
        opt_level=0,  # the session applies the graph optimizations; this pass only fuses
        use_gpu=use_gpu,
    )


def _fused_operators(model: Any) -> dict[str, int]:
    """How many of each operator the fusion made, those it made at all."""
    return {name: count for name, count in model.get_fused_operator_statistics().items() if count}


def main() -> None:
    export, target, num_heads, hidden_size, device = sys.argv[1:]
    fused = fuse(Path(export), Path(target), int(num_heads), int(hidden_size), device == "gpu")
    print(json.dumps(fused))


if __name__ == "__main__":
    main()
