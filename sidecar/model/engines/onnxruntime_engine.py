"""ONNX Runtime: the compiled path on the CPU (and on CUDA where onnxruntime-gpu is installed).

fp32 runs the exported graph after ``onnxruntime.transformers`` fuses BERT-family attention,
LayerNorm and GELU; int8 gives that fused graph's weight MatMuls per-channel int8 weights while the
activations stay fp32, so a pair's score never depends on what shares its batch.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from sidecar.errors import ModelLoadError
from sidecar.model.batch import TokenBatch
from sidecar.model.cache import ArtifactCache
from sidecar.model.engines.base import Engine, require_precision
from sidecar.model.engines.onnxruntime_fusion import fuse_export
from sidecar.model.engines.registry import EngineInputs, EngineShape, EngineSpec, Offer, offer
from sidecar.model.export import OUTPUT_NAME, ExportedModel
from sidecar.model.hardware import cpu_info

logger = logging.getLogger(__name__)

# Model types whose encoder the BERT fusion of onnxruntime.transformers recognises.
BERT_FAMILY = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "mpnet"})
# Bumped whenever the int8 recipe below changes, so cached quantized files are rebuilt.
_INT8_RECIPE = "weight-only-per-channel-matmul-v3"
# Encoder layers are named ``layer.N`` (BERT, DeBERTa) or ``layers.N`` (ModernBERT, decoder LLMs).
_LAYER_INDEX = re.compile(r"/layers?\.(\d+)/")


def onnxruntime_precisions(device: str) -> tuple[str, ...]:
    """Precisions this engine offers on the device, fastest first."""
    return ("fp32",) if device.startswith("cuda") or int8_withheld_reason(device) else ("int8", "fp32")


def int8_withheld_reason(device: str) -> str | None:
    """Why int8 is not offered on this CPU, or None where it is."""
    cpu = cpu_info()
    if device == "cpu" and not cpu.has_int8_dot:
        return (
            f"this CPU ({cpu.describe()}) has no int8 dot-product instructions (VNNI), where ONNX "
            "Runtime's int8 kernels can saturate and move scores"
        )
    return None


def _providers(device: str) -> list[str | tuple[str, dict[str, str]]]:
    import onnxruntime

    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise ModelLoadError(
            "ONNX Runtime has no CUDA execution provider here; install onnxruntime-gpu to run it on "
            f"{device}, or use --device cpu"
        )
    return [("CUDAExecutionProvider", {"device_id": _device_id(device)}), "CPUExecutionProvider"]


def _device_id(device: str) -> str:
    """The CUDA device's index: ``cuda:1`` is 1, ``cuda`` is 0."""
    return device.partition(":")[2] or "0"


def optimized_model(exported: ExportedModel, precision: str, device: str, cache: ArtifactCache) -> Path:
    """The ONNX file this engine runs: fused for BERT-family models, then for int8 with int8 weights."""
    import onnxruntime

    use_gpu = device.startswith("cuda")
    fusable = exported.model_type in BERT_FAMILY and exported.num_heads > 0
    key = {
        "onnx": exported.fingerprint,
        "source": exported.path.parent.name,
        "onnxruntime": onnxruntime.__version__,
        "fusion": f"bert-gpu={use_gpu}" if fusable else "none",
    }
    fused = exported.path
    if fusable:
        fused = cache.get_or_build(
            "ort-fused", key, "model.onnx", lambda target: _fuse(exported, use_gpu, target)
        )
    if precision == "fp32":
        return fused
    return cache.get_or_build(
        "ort-int8", {**key, "int8": _INT8_RECIPE}, "model.onnx", lambda target: _quantize(fused, target)
    )


def _fuse(exported: ExportedModel, use_gpu: bool, target: Path) -> None:
    fused = fuse_export(exported.path, target, exported.num_heads, exported.hidden_size, use_gpu)
    logger.info("ONNX Runtime fused %s: %s", exported.model_type, fused or "nothing")


def _quantize(fused: Path, target: Path) -> None:
    """int8 weights for the encoder's weight MatMuls, keeping what ranking is most sensitive to in fp32.

    Per-output-channel symmetric scales, stored as int8 initializers behind DequantizeLinear, which
    ONNX Runtime fuses with the MatMul into an 8-bit weight kernel. Activations stay fp32: dynamic
    quantization measured their scale per batch, so a pair's score moved with its batch companions
    (benchmarks/RESULTS.md, "int8"). Attention (activation x activation) stays fp32; so do the last
    encoder layer and the head after it.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(fused))
    graph = model.graph
    weights = {initializer.name: initializer for initializer in graph.initializer}
    matmuls = [node for node in graph.node if node.op_type == "MatMul"]
    layers = {int(match.group(1)) for node in matmuls if (match := _LAYER_INDEX.search(node.name))}
    last_layer = max(layers) if layers else None
    quantized: dict[str, str] = {}
    dequantize_nodes = []
    for node in matmuls:
        match = _LAYER_INDEX.search(node.name)
        in_encoder = match is not None and int(match.group(1)) != last_layer
        weight = weights.get(node.input[1])
        if not in_encoder or weight is None or len(weight.dims) != 2:
            continue
        if weight.name not in quantized:
            values = numpy_helper.to_array(weight).astype(np.float32, copy=False)
            scale = np.maximum(np.abs(values).max(axis=0), np.finfo(np.float32).tiny) / 127.0
            codes = np.clip(np.round(values / scale), -127, 127).astype(np.int8)
            names = [f"{weight.name}.int8", f"{weight.name}.scale", f"{weight.name}.zero_point"]
            graph.initializer.extend(
                [
                    numpy_helper.from_array(codes, names[0]),
                    numpy_helper.from_array(scale.astype(np.float32), names[1]),
                    numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), names[2]),
                ]
            )
            quantized[weight.name] = f"{weight.name}.dequantized"
            dequantize_nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    names,
                    [quantized[weight.name]],
                    name=f"{weight.name}/dequantize",
                    axis=1,
                )
            )
        node.input[1] = quantized[weight.name]
    if not quantized:
        # Serving the fp32 graph under the int8 label would report a speed-up that is not there.
        raise ModelLoadError("int8: no encoder weight MatMul found to quantize in this graph")
    still_used = {name for node in graph.node for name in node.input}
    replaced = [
        index
        for index, initializer in enumerate(graph.initializer)
        if initializer.name in quantized and initializer.name not in still_used
    ]
    # Deleted in place: rebuilding the list would copy every initializer, a second model in memory.
    del weights
    for index in reversed(replaced):
        del graph.initializer[index]
    # Their inputs are all initializers, so they can run first.
    for position, node in enumerate(dequantize_nodes):
        graph.node.insert(position, node)
    logger.info("int8 weights for %d of %d MatMuls; the rest stay fp32", len(quantized), len(matmuls))
    onnx.save(model, str(target))


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"
    compiled = True
    forward_on_worker_share = True

    def __init__(
        self,
        exported: ExportedModel,
        cache: ArtifactCache,
        *,
        precision: str,
        device: str,
        threads: int,
    ) -> None:
        require_precision(self.name, precision, device, onnxruntime_precisions(device))
        import onnxruntime

        super().__init__(precision=precision, device=device)
        providers = _providers(device)  # before any compiling: a missing CUDA provider fails fast
        path = optimized_model(exported, precision, device, cache)
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads  # 0: one per core
        options.inter_op_num_threads = 1
        # Idle pool threads would spin for a while after each batch, taking the cores that
        # tokenization, gRPC and any neighbour process need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelLoadError(f"ONNX Runtime could not load {path}: {exc}") from exc
        self._input_names = exported.input_names
        logger.info("onnxruntime engine ready: %s on %s from %s", precision, device, path)

    def forward(self, batch: TokenBatch) -> np.ndarray:
        return self._run(batch)

    def release_scratch(self) -> None:
        # The arena keeps the chunks it grew for the largest batch it ran; a run that asks for shrinkage
        # gives back every chunk that run leaves unused, so a smallest batch gives back nearly all.
        import onnxruntime

        options = onnxruntime.RunOptions()
        arenas = ["cpu:0"] + ([] if self.device == "cpu" else [f"gpu:{_device_id(self.device)}"])
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", ";".join(arenas))
        ones = np.ones((1, 2), dtype=np.int64)
        self._run(TokenBatch(np.zeros_like(ones), ones, np.zeros_like(ones)), options)

    def _run(self, batch: TokenBatch, options: Any = None) -> np.ndarray:
        feeds = batch.as_dict()
        (outputs,) = self._session.run(
            [OUTPUT_NAME], {name: feeds[name] for name in self._input_names}, options
        )
        return np.asarray(outputs, dtype=np.float32)


def _offered(device: str) -> Offer:
    missing = importlib.util.find_spec("onnxruntime") is None
    return offer(
        "the onnxruntime package is not installed" if missing else None,
        lambda: onnxruntime_precisions(device),
    )


def _withheld(device: str) -> dict[str, str]:
    reason = int8_withheld_reason(device) if device == "cpu" else None
    return {"int8": reason} if reason else {}


def _build(inputs: EngineInputs, shape: EngineShape, precision: str) -> Engine:
    return OnnxRuntimeEngine(
        inputs.exported(), inputs.cache, precision=precision, device=shape.device, threads=shape.threads
    )


SPEC = EngineSpec("onnxruntime", _offered, _build, _withheld)
