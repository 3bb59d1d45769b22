"""ONNX Runtime: the compiled path on the CPU (and on CUDA where onnxruntime-gpu is installed).

fp32 runs the exported graph after ``onnxruntime.transformers`` fuses BERT-family attention,
LayerNorm and GELU; int8 quantizes that fused graph's weights dynamically (VNNI kernels).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from sidecar.errors import ModelLoadError
from sidecar.model.batch import TokenBatch
from sidecar.model.cache import ArtifactCache
from sidecar.model.engines.base import Engine
from sidecar.model.export import OUTPUT_NAME, ExportedModel
from sidecar.model.hardware import cpu_info

logger = logging.getLogger(__name__)

# Model types whose encoder the BERT fusion of onnxruntime.transformers recognises.
BERT_FAMILY = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "mpnet"})
# Bumped whenever the int8 recipe below changes, so cached quantized files are rebuilt.
_INT8_RECIPE = "per-channel-matmul-v1"
_LAYER_INDEX = re.compile(r"/layer\.(\d+)/")


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
    device_id = device.partition(":")[2] or "0"
    return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]


def optimized_model(exported: ExportedModel, precision: str, device: str, cache: ArtifactCache) -> Path:
    """The ONNX file this engine runs: fused for BERT-family models, then quantized for int8."""
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
    from onnxruntime.transformers import optimizer

    model = optimizer.optimize_model(
        str(exported.path),
        model_type="bert",
        num_heads=exported.num_heads,
        hidden_size=exported.hidden_size,
        opt_level=0,  # the session applies the graph optimizations; this pass only fuses
        use_gpu=use_gpu,
    )
    fused = {name: count for name, count in model.get_fused_operator_statistics().items() if count}
    logger.info("ONNX Runtime fused %s: %s", exported.model_type, fused or "nothing")
    model.save_model_to_file(str(target))


def _quantize(fused: Path, target: Path) -> None:
    """Dynamic int8 of the encoder's weight MatMuls, keeping what ranking is most sensitive to in fp32.

    Per-channel weight scales; attention (activation x activation) stays fp32; so do the last
    encoder layer and the head after it. Measured on MiniLM-L6 weights, this keeps the top 10
    where plain ``quantize_dynamic`` reorders it.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(fused)).graph
    matmuls = [node.name for node in graph.node if node.op_type == "MatMul"]
    layers = {int(match.group(1)) for name in matmuls if (match := _LAYER_INDEX.search(name))}
    last_layer = f"/layer.{max(layers)}/" if layers else None
    keep_fp32 = [
        name
        for name in matmuls
        if not _LAYER_INDEX.search(name) or (last_layer is not None and last_layer in name)
    ]
    logger.info("quantizing to int8, keeping %d of %d MatMuls in fp32", len(keep_fp32), len(matmuls))
    quantize_dynamic(
        fused,
        target,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=keep_fp32,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"
    compiled = True

    def __init__(
        self, exported: ExportedModel, cache: ArtifactCache, *, precision: str, device: str, threads: int
    ) -> None:
        if precision not in onnxruntime_precisions(device):
            raise ModelLoadError(
                f"the onnxruntime engine does not run {precision} on {device}; it offers "
                f"{', '.join(onnxruntime_precisions(device))} there"
            )
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
        feeds = batch.as_dict()
        (outputs,) = self._session.run([OUTPUT_NAME], {name: feeds[name] for name in self._input_names})
        return np.asarray(outputs, dtype=np.float32)
