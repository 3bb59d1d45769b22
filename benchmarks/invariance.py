"""Fidelity and batch invariance of every engine and precision this machine offers, with their speed.

For each candidate the sidecar could serve here (the engines benchmark's model: the all-MiniLM-L6-v2
encoder with a fresh seeded one-logit head):

- the parity gate's measures against torch fp32 on the probe set (max abs diff, Spearman, how many
  of the 10 best-scored probe pairs stay in the top 10); OpenVINO's static int8 is calibrated on the
  packaged pairs, as the sidecar calibrates it by default;
- batch invariance: the worst change of a pair's normalized score between scoring it alone and
  scoring it first in a batch with 16 other SciFact abstracts (padded to the longest), over 40 pairs;
- rows per second on the batch the selection times (16 pairs of 256 tokens), on one thread, as one
  of the sidecar's batch workers runs it.

ONNX Runtime's dynamic int8 (``quantize_dynamic``, the recipe the sidecar used before its weight-only
int8) is measured beside them for comparison.

    .venv/bin/python -m benchmarks.invariance [--out benchmarks/out/invariance.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import OUT, QUERY, build_model, candidates, hardware_record

_PAIRS, _CROWD, _ROUNDS = 40, 16, 3


def main() -> None:
    from sidecar.model.batch import collate
    from sidecar.model.cache import ArtifactCache
    from sidecar.model.calibration import model_calibration, read_calibration
    from sidecar.model.engines.onnxruntime_engine import OnnxRuntimeEngine, onnxruntime_precisions
    from sidecar.model.engines.openvino_engine import OpenVinoEngine, openvino_precisions
    from sidecar.model.engines.openvino_int8 import StaticInt8
    from sidecar.model.engines.selection import EngineRequest, typical_batch
    from sidecar.model.engines.torch_engine import TorchEngine, torch_precisions
    from sidecar.model.export import export_onnx
    from sidecar.model.kinds import load_network
    from sidecar.model.loading import ModelKind, ModelSource, load_cross_encoder
    from sidecar.model.network import content_hash
    from sidecar.model.parity import compare, cross_encoder_probe
    from sidecar.model.tokenization import PairSpec

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=OUT / "invariance.json")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    model_dir = build_model(OUT / "minilm-l6-cross-encoder")
    source = ModelSource(str(model_dir))
    model = load_cross_encoder(source, 256)
    network = load_network(source, ModelKind.CROSS_ENCODER)
    cache = ArtifactCache(OUT / "cache")
    exported = export_onnx(
        network, content_hash(network), ("input_ids", "attention_mask", "token_type_ids"), cache
    )
    engines: dict[str, object] = {
        f"torch/{precision}": TorchEngine(network, precision=precision)
        for precision in torch_precisions("cpu")
    }
    for precision in onnxruntime_precisions("cpu"):
        engines[f"onnxruntime/{precision}"] = OnnxRuntimeEngine(
            exported, cache, precision=precision, device="cpu", threads=1
        )
    calibration = model_calibration(model, read_calibration(""))
    int8_models = StaticInt8(exported, calibration, cache)
    for precision in openvino_precisions("cpu"):
        if precision != "int8":
            engines[f"openvino/{precision}"] = OpenVinoEngine(
                exported, cache, precision=precision, device="cpu", threads=1, workers=1
            )
            continue
        # Both of static int8's models, fastest first: the sidecar serves the first that passes the gate.
        for label, int8_model in (
            ("openvino/int8", int8_models.all_in_int8()),
            ("openvino/int8 (feed-forward outputs in fp32)", int8_models.feed_forward_in_fp32("measured")),
        ):
            engines[label] = OpenVinoEngine(
                exported, cache, precision="int8", device="cpu", threads=1, workers=1, model=int8_model
            )
    engines["onnxruntime/int8 dynamic (former recipe)"] = DynamicInt8(exported.path, exported.input_names)

    probe = cross_encoder_probe(model, 32, vocab_size=network.model.get_input_embeddings().num_embeddings)
    reference = probe.scores(engines["torch/fp32"])  # type: ignore[arg-type]
    pairs = model.tokenizer.encode(QUERY, candidates(model_dir), PairSpec(max_length=256)).pairs
    crowd = pairs[_PAIRS : _PAIRS + _CROWD]
    request = EngineRequest(
        engine="auto",
        precision="auto",
        device="cpu",
        threads=1,
        max_batch_pairs=32,
        max_batch_tokens=4096,
        max_length=256,
        cache_dir=OUT / "cache",
        torch_compile="off",
    )
    timing_batch = typical_batch(request, probe)
    rows = []
    for name, engine in engines.items():
        report = compare(probe.scores(engine), reference, "int8" if "int8" in name else "fp32")  # type: ignore[arg-type]
        worst = 0.0
        for pair in pairs[:_PAIRS]:
            alone = engine.forward(collate([pair], model.pad_token_id, True))[0, 0]  # type: ignore[attr-defined]
            among = engine.forward(collate([pair, *crowd], model.pad_token_id, True))[0, 0]  # type: ignore[attr-defined]
            worst = max(worst, abs(_sigmoid(alone) - _sigmoid(among)))
        engine.forward(timing_batch)  # type: ignore[attr-defined]
        best = float("inf")
        for _ in range(_ROUNDS):
            started = time.perf_counter()
            engine.forward(timing_batch)  # type: ignore[attr-defined]
            best = min(best, time.perf_counter() - started)
        rows.append(
            {
                "candidate": name,
                "max_abs_diff": report.max_abs_diff,
                "spearman": report.spearman,
                "top10_kept": report.top_kept,
                "invariance_worst": worst,
                "rows_per_s": timing_batch.shape[0] / best,
            }
        )
    hardware = hardware_record()
    print(f"hardware: {hardware['cpu']} ({hardware['isa_class']}), 1 thread")
    print(
        "| candidate | max abs diff vs fp32 | Spearman | top-10 kept | worst score change alone vs in a "
        "batch | rows/s |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['candidate']} | {row['max_abs_diff']:.2e} | {row['spearman']:.4f} | "
            f"{row['top10_kept']}/10 | {row['invariance_worst']:.1e} | {row['rows_per_s']:.1f} |"
        )
    args.out.write_text(json.dumps({"hardware": hardware, "rows": rows}, indent=2))


def _sigmoid(logit: float) -> float:
    return float(1.0 / (1.0 + np.exp(-float(logit))))


class DynamicInt8:
    """``quantize_dynamic`` of the plain export's MatMuls (per-channel weights): its activation scale is
    measured on each batch at run time."""

    def __init__(self, onnx_path: Path, input_names: tuple[str, ...]) -> None:
        import onnxruntime
        from onnxruntime.quantization import QuantType, quantize_dynamic

        target = OUT / "dynamic-int8.onnx"
        quantize_dynamic(
            onnx_path, target, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8
        )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
        self._input_names = input_names

    def forward(self, batch: object) -> np.ndarray:
        feeds = batch.as_dict()  # type: ignore[attr-defined]
        (outputs,) = self._session.run(None, {name: feeds[name] for name in self._input_names})
        return np.asarray(outputs, dtype=np.float32)


if __name__ == "__main__":
    main()
