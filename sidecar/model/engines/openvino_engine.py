"""OpenVINO Runtime: a compiled CPU engine that runs the plain ONNX export through its own graph compiler.

fp32 everywhere; bf16 on CPUs with native bf16 (AVX512-BF16 or AMX), where it measured faster than the
compiled torch bf16 engine (benchmarks/RESULTS.md, "OpenVINO"). int8 is static: NNCF's post-training
quantization (``openvino_int8``) gives the weights and the activations int8 with scales fixed by
calibration (the feed-forward output projections' activations get one per group of a token's values,
at run time), so the matrix products run on the CPU's int8 dot products and a pair's score does not
depend on its batch companions; of its models the fastest that passes the parity gate serves. Each
batch worker gets a stream of its own with its share of the threads, and an inference request per
model thread; inference releases the GIL. The compiled blob is
cached like every other artifact (``ArtifactCache``: a manifest and a checksum, verified before each
use), keyed by the model, the configuration, OpenVINO's version and the CPU, so a restart compiles
nothing. OpenVINO's own ``CACHE_DIR`` is not used: it loads its blobs unchecked, and a damaged one
served NaN scores for the inputs that read the damaged weights.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sidecar.errors import ModelLoadError
from sidecar.model.batch import TokenBatch
from sidecar.model.cache import ArtifactCache
from sidecar.model.engines.base import Engine, require_precision
from sidecar.model.engines.openvino_int8 import StaticInt8, int8_withheld_reason
from sidecar.model.engines.registry import EngineInputs, EngineShape, EngineSpec, Gate, offer
from sidecar.model.export import ExportedModel
from sidecar.model.hardware import cpu_info, device_fingerprint

logger = logging.getLogger(__name__)

_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
# Enough for one forward pass's executors, which its layers share, and a few batch shapes more.
RUNTIME_CACHE_CAPACITY = 32


def openvino_precisions(device: str) -> tuple[str, ...]:
    """Precisions this engine offers on the device, fastest first. Static int8 is offered wherever
    OpenVINO has int8 kernels faster than fp32 ones (``int8_withheld_reason``): the parity gate and the
    timing decide whether it serves."""
    if device != "cpu":
        return ()
    int8 = () if int8_withheld_reason() else ("int8",)
    return (*int8, "bf16", "fp32") if cpu_info().has_native_bf16 else (*int8, "fp32")


def unavailable_reason(device: str) -> str | None:
    """Why OpenVINO cannot run here, or None when it can be tried."""
    if device != "cpu":
        return f"OpenVINO runs on the CPU here; the device is {device}"
    if importlib.util.find_spec("openvino") is None:
        return "the openvino package is not installed"
    return None


def _int8_rest_precision() -> str:
    """What the int8 model runs outside int8 (the parts kept in higher precision, softmax, LayerNorm):
    bf16 where the CPU has it natively, which measured faster at the same fidelity, else fp32."""
    return "bf16" if cpu_info().has_native_bf16 else "f32"


class OpenVinoEngine(Engine):
    name = "openvino"
    compiled = True
    forward_on_worker_share = True
    # Its time per pair is the same from 4 to 16 pairs of 230 tokens, while each stream's scratch
    # memory grows with a batch's tokens (benchmarks/RESULTS.md, "Start-up to SERVING and memory").
    preferred_batch_tokens = 2048

    def __init__(
        self,
        exported: ExportedModel,
        cache: ArtifactCache,
        *,
        precision: str,
        device: str,
        threads: int,
        workers: int,
        model: Path | None = None,
    ) -> None:
        """``model`` is the OpenVINO model to compile: by default the export (fp32) or its copy with fp16
        weights (bf16); int8 needs one of ``StaticInt8``'s."""
        require_precision(self.name, precision, device, openvino_precisions(device))
        import openvino

        super().__init__(precision=precision, device=device)
        config = {
            "INFERENCE_PRECISION_HINT": _PRECISION_HINTS.get(precision, _int8_rest_precision()),
            # One stream per batch worker, each with that worker's share of the threads.
            "NUM_STREAMS": workers,
            "INFERENCE_NUM_THREADS": threads * workers,
            # Pinned, every model's first stream takes the first core: two models' batches at once then
            # share one core while another idles (benchmarks/RESULTS.md, "Two models in one sidecar").
            "ENABLE_CPU_PINNING": False,
            # Executors kept per stream for the batch shapes it ran. OpenVINO's default (5000) lets a
            # stream hold about 2 MB for every shape until then, and traffic brings ever new shapes;
            # a miss measured about 2% slower (benchmarks/RESULTS.md, "Memory under varied traffic").
            "CPU_RUNTIME_CACHE_CAPACITY": RUNTIME_CACHE_CAPACITY,
        }
        if model is not None:
            path = model
        elif precision == "int8":
            raise ModelLoadError("OpenVINO int8 needs a static int8 model (StaticInt8)")
        elif precision == "bf16":
            path = half_weights_model(exported, cache)
        else:
            path = exported.path
        # The directory names the artifact's cache key (for int8 it covers the calibration too).
        source_key = {"onnx": exported.fingerprint, "source": path.parent.name}
        self._compiled = compile_cached(openvino.Core(), path, source_key, config, cache)
        self._input_names = exported.input_names
        # An inference request is not safe to share between threads: each model thread gets its own.
        self._requests = threading.local()
        logger.info(
            "openvino engine ready: %s on %s, %d stream(s) of %d thread(s)",
            precision,
            device,
            workers,
            threads,
        )

    def forward(self, batch: TokenBatch) -> np.ndarray:
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self._compiled.create_infer_request()
        feeds = batch.as_dict()
        outputs = request.infer({name: feeds[name] for name in self._input_names})
        # The request reuses its output buffer on the next call: copy the rows out.
        return np.array(outputs[0], dtype=np.float32, copy=True)

    def release_scratch(self) -> None:
        # Each stream keeps its intermediate buffers at the largest batch shape it ran, the larger part
        # of a busy compiled model's footprint (benchmarks/RESULTS.md, "Start-up to SERVING and
        # memory"). OpenVINO refuses while an inference runs; the batcher calls this only when none does.
        self._compiled.release_memory()


def half_weights_model(exported: ExportedModel, cache: ArtifactCache) -> Path:
    """The export as an OpenVINO model with its weights stored in fp16, for bf16 inference. The
    compiled model keeps its constants as stored beside the bf16 copies it computes with, so fp32
    storage held twice what fp16 does (benchmarks/RESULTS.md, "Start-up to SERVING and memory"); bf16
    keeps fewer mantissa bits than fp16, so the weights it computes with hardly move, and the parity
    gate judges the scores as for any bf16 engine."""
    import openvino

    def convert(target: Path) -> None:
        model = openvino.Core().read_model(str(exported.path))
        openvino.save_model(model, str(target), compress_to_fp16=True)

    key = {
        "onnx": exported.fingerprint,
        "source": exported.path.parent.name,
        "openvino": openvino.__version__,
    }
    return cache.get_or_build("openvino-fp16-weights", key, "model.xml", convert)


def compile_cached(
    core: Any, model: Path, model_key: Mapping[str, str], config: Mapping[str, Any], cache: ArtifactCache
) -> Any:
    """``model`` compiled for this CPU with ``config``: from a verified blob in ``cache`` when one is
    there, else compiled now and its blob cached. ``model_key`` identifies the model file's content.

    The blob is an artifact like any other: a damaged, truncated or stale one is logged and rebuilt.
    """
    import openvino

    key = {
        **model_key,
        "openvino": openvino.__version__,
        **device_fingerprint("cpu"),
        **{name: str(value) for name, value in config.items()},
    }
    compiled_now: list[Any] = []

    def build(target: Path) -> None:
        compiled = _load_error_if_failing(lambda: core.compile_model(str(model), "CPU", dict(config)), model)
        target.write_bytes(compiled.export_model().getbuffer())
        compiled_now.append(compiled)

    blob = cache.get_or_build("openvino", key, "model.blob", build)
    if compiled_now:
        return compiled_now[0]
    return _load_error_if_failing(lambda: core.import_model(blob.read_bytes(), "CPU", dict(config)), blob)


def _load_error_if_failing(compile_or_import: Callable[[], Any], path: Path) -> Any:
    """What ``compile_or_import`` returns; its failure as a ModelLoadError naming ``path``."""
    try:
        return compile_or_import()
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
        raise ModelLoadError(f"OpenVINO could not compile or load {path}: {exc}") from exc


def _build(inputs: EngineInputs, shape: EngineShape, precision: str) -> Engine:
    exported = inputs.exported()

    def engine(model: Path | None = None) -> OpenVinoEngine:
        return OpenVinoEngine(
            exported,
            inputs.cache,
            precision=precision,
            device=shape.device,
            threads=shape.threads,
            workers=shape.workers,
            model=model,
        )

    if precision != "int8":
        return engine()
    return static_int8_engine(StaticInt8(exported, inputs.calibration, inputs.cache), engine, inputs.gate)


def static_int8_engine(models: StaticInt8, engine: Callable[[Path], Engine], gate: Gate | None) -> Engine:
    """The engine of the fastest static int8 model that passes ``gate`` (without one, the fastest): the
    model with the feed-forward output projections in int8, else (it failed the gate, or failed to run
    on this CPU) the one with them in fp32 from the same calibration. A refused model is removed from
    the cache, so later starts, warm ones too, go straight to the one that passed. The one returned is
    gated again by the selection, as every candidate is."""
    refused = models.refused_before()
    if refused is None:
        first_model = models.all_in_int8()
        first: Engine | None = None
        try:
            first = engine(first_model)
            report = gate(first) if gate is not None else None
        except Exception as exc:  # OpenVINO raises where the CPU lacks a kernel, compiling or running
            if not models.has_fallback():
                raise
            if first is not None:
                first.close()
            refused = f"it failed to run: {type(exc).__name__}: {_first_line(exc)}"
        else:
            if report is None or report.passed or not models.has_fallback():
                return first
            first.close()
            refused = f"it failed the parity gate: {report.describe()}"
        logger.info("static int8 with the feed-forward output projections in int8: %s", refused)
        path = models.feed_forward_in_fp32(refused)
        models.discard_all_in_int8()
    else:
        path = models.feed_forward_in_fp32(refused)
    fallback = engine(path)
    fallback.note = (
        f"static int8 with the feed-forward output projections in fp32; with them in int8, {refused}"
    )
    return fallback


def _first_line(exc: Exception) -> str:
    """OpenVINO's errors run over several lines (the source location first): the first that says why."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith("Exception from ")]
    return (reasons or lines or [""])[0]


def _withheld(device: str) -> dict[str, str]:
    reason = int8_withheld_reason() if device == "cpu" else None
    return {"int8": reason} if reason else {}


SPEC = EngineSpec(
    "openvino",
    lambda device: offer(unavailable_reason(device), lambda: openvino_precisions(device)),
    _build,
    _withheld,
)
