"""Static int8 for OpenVINO: NNCF post-training quantization of the ONNX export, calibrated on pairs.

Weights get per-channel int8 scales and activations per-tensor ones, both fixed by calibration on
``Calibration`` rows (``sidecar.model.calibration``), so a pair's score never depends on what shares
its batch. NNCF's transformer preset keeps softmax, LayerNorm and the GELU in floating point; beyond
that the parts kept out of int8 (``HIGHER_PRECISION``) were chosen by measuring fidelity against fp32
with each left in and out (benchmarks/RESULTS.md, "Static int8"). The quantized model is an artifact
like the others: cached under ``--cache-dir`` by the export, the library versions, the recipe and the
calibration rows' digest, so a warm start does not calibrate again.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import re
from pathlib import Path

from sidecar.errors import ModelLoadError
from sidecar.model.cache import ArtifactCache
from sidecar.model.calibration import Calibration
from sidecar.model.export import ExportedModel
from sidecar.model.hardware import cpu_info

logger = logging.getLogger(__name__)

# Bumped whenever the recipe below changes, so cached quantized models are rebuilt.
_RECIPE = "nncf-transformer-v1"
# Operations kept out of int8, as regular expressions over the graph's node names: the pooler and
# classifier head, whose one logit is the score itself; and in every encoder layer the two output
# projections that write into the residual sums (after attention, and after the feed-forward GELU).
# Chosen by fidelity against fp32 on real MiniLM-L6 weights (benchmarks/RESULTS.md, "Static int8"):
# keeping the head alone, or with the last layer or attention's products, stayed below Spearman 0.995.
HIGHER_PRECISION = (r".*/(pooler|classifier|score)/.*", r".*/output/dense/MatMul")


def nncf_unavailable_reason() -> str | None:
    if importlib.util.find_spec("nncf") is None:
        return "the nncf package is not installed (static int8 is calibrated with NNCF)"
    return None


def overflow_fix() -> str:
    """NNCF's overflow fix: on a CPU without int8 dot products (VNNI), OpenVINO multiplies u8 by s8 with
    ``vpmaddubsw``, whose 16-bit sums can saturate, so every weight keeps 7 bits; with VNNI none need."""
    return "disable" if cpu_info().has_int8_dot else "enable"


def static_int8_model(
    exported: ExportedModel,
    calibration: Calibration | None,
    cache: ArtifactCache,
) -> Path:
    """The quantized OpenVINO model (its .xml; the weights lie beside it), calibrated when not cached."""
    if calibration is None:
        raise ModelLoadError("static int8 needs calibration pairs, and none were given")
    import openvino

    fix = overflow_fix()
    key = {
        "onnx": exported.fingerprint,
        "source": exported.path.parent.name,
        "openvino": openvino.__version__,
        "nncf": importlib.metadata.version("nncf"),
        "recipe": _RECIPE,
        "higher_precision": ",".join(HIGHER_PRECISION),
        "overflow_fix": fix,
        "calibration": calibration.digest(),
    }
    return cache.get_or_build(
        "openvino-int8",
        key,
        "model.xml",
        lambda target: _quantize(exported, calibration, fix, target),
    )


def _quantize(exported: ExportedModel, calibration: Calibration, fix: str, target: Path) -> None:
    import nncf
    import openvino
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    # NNCF prints a line to stdout for every node it leaves unquantized; the sidecar logs a summary.
    nncf.set_log_level(logging.WARNING)
    model = openvino.Core().read_model(str(exported.path))
    names = [op.get_friendly_name() for op in model.get_ops()]
    kept = [pattern for pattern in HIGHER_PRECISION if any(re.fullmatch(pattern, name) for name in names)]
    inputs = exported.input_names
    dataset = nncf.Dataset(list(calibration.rows), lambda row: {name: row.as_dict()[name] for name in inputs})
    logger.info(
        "calibrating static int8 on %d rows of %s (%s kept in higher precision)",
        len(calibration.rows),
        calibration.source,
        ", ".join(kept) or "nothing",
    )
    try:
        quantized = nncf.quantize(
            model,
            dataset,
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(calibration.rows),
            ignored_scope=nncf.IgnoredScope(patterns=kept, validate=False),
            advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix(fix)),
        )
    except Exception as exc:  # NNCF raises many types for graphs it cannot handle
        raise ModelLoadError(f"NNCF could not quantize the model: {type(exc).__name__}: {exc}") from exc
    fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())
    if not fake_quantize:
        # Serving the fp32 graph under the int8 label would report a speed-up that is not there.
        raise ModelLoadError("NNCF could not quantize the model: it placed no int8 quantizer in the graph")
    logger.info("static int8: %d quantizers placed", fake_quantize)
    openvino.save_model(quantized, str(target), compress_to_fp16=False)
