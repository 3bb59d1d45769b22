"""Static int8 for OpenVINO: NNCF post-training quantization of the ONNX export, calibrated on pairs.

Weights get per-channel int8 scales and activations per-tensor ones, both fixed by calibration on
``Calibration`` rows (``sidecar.model.calibration``). NNCF's transformer preset keeps softmax, LayerNorm
and the GELU in floating point; beyond that the parts kept out of int8 were chosen by measuring fidelity
against fp32 (benchmarks/RESULTS.md, "Static int8"). The feed-forward output projections, whose input
(after the GELU) carries most of a per-tensor scale's error, quantize their activation at run time
instead: OpenVINO's dynamic quantization, one scale per group of a token's values, so a token's scale
depends on that token alone and a pair's score never on what shares its batch.

One calibration gives two models, fastest first (``StaticInt8``): every projection but the head's and
attention's output one in int8, and the same model with the feed-forward output projections back in
fp32, for a model whose scores the first moves past the parity gate. The engine serves the first that
passes. Both are artifacts like the others: cached under ``--cache-dir`` by the export, the library
versions, the recipe and the calibration rows' digest, so a warm start does not calibrate again.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import logging
import re
from pathlib import Path
from typing import Any

from sidecar.errors import ModelLoadError
from sidecar.model.cache import ArtifactCache, remove_entries
from sidecar.model.calibration import Calibration
from sidecar.model.export import ExportedModel
from sidecar.model.hardware import cpu_info

logger = logging.getLogger(__name__)

# Bumped whenever the recipe below changes, so cached quantized models are rebuilt.
_RECIPE = "nncf-transformer-v5"
# Operations kept out of int8, as regular expressions over the graph's node names: the pooler and
# classifier head, whose one logit is the score itself, and in every encoder layer the output projection
# after attention, which writes into the first residual sum. Chosen by fidelity against fp32 on real
# MiniLM-L6 weights (benchmarks/RESULTS.md, "Static int8"): keeping the head alone, or with the last
# layer or attention's products, stayed below Spearman 0.995.
HIGHER_PRECISION = (r".*/(pooler|classifier|score)/.*", r".*/attention/output/dense/MatMul")
# The feed-forward output projections (after the GELU, into the second residual sum): faster in int8,
# and the part of the recipe some models' scores do not bear; the fallback model has them back in fp32
# (benchmarks/RESULTS.md, "Static int8: the feed-forward output projections").
FEED_FORWARD_OUTPUT = r"(?!.*/attention/).*/output/dense/MatMul"
# In the first model their activations are quantized at run time, in groups of this many of a token's
# values (OpenVINO's DYNAMIC_QUANTIZATION_GROUP_SIZE, carried in the model file), their weights per
# channel: near a calibrated scale's speed at the fallback's fidelity, with no group size measured
# (32 to a whole token) better than another (benchmarks/RESULTS.md, "Static int8: the feed-forward
# output projections quantized at run time"). 128 divides the common intermediate sizes.
DYNAMIC_GROUP = 128
# SmoothQuant's migration strength for matrix products. NNCF's default for transformers (0.95) moved
# MiniLM-L6's scores past the gate with the feed-forward output projections in int8; 0.7 kept both
# models measured within it (benchmarks/RESULTS.md, "Static int8: the feed-forward output projections").
_SMOOTH_QUANT_ALPHA = 0.7
# Embedding tables stay out of int8 and are stored in fp16: OpenVINO's CPU plugin gathers from an fp16
# table as it is, but widens an int8 or fp32 one to fp32 when it compiles, which held about twice the
# table's fp16 size for every model (benchmarks/RESULTS.md, "Static int8: embedding tables in fp16").
_EMBEDDING_LOOKUP = "Gather"
# Beside the fallback model: why the gate refused the first.
_REFUSAL = "refused.txt"
# NNCF names the multiply it puts before a smoothed matrix product's activation quantizer so.
_SMOOTH_QUANT_NODE = "nncf_smooth_quant"


def int8_withheld_reason() -> str | None:
    """Why static int8 is not offered on this CPU, or None where it is. An x86 CPU with neither AVX-512
    nor int8 dot products (AVX2 alone) has no oneDNN int8 kernel of its own: OpenVINO's int8 matrix
    products fall back to a generic gemm that runs slower than its fp32 ones (benchmarks/RESULTS.md,
    "Static int8 without VNNI"), so calibrating would only lengthen each first start."""
    if importlib.util.find_spec("nncf") is None:
        return "the nncf package is not installed (static int8 is calibrated with NNCF)"
    cpu = cpu_info()
    if cpu.architecture == "x86_64" and not cpu.has_int8_dot and "avx512f" not in cpu.features:
        return (
            f"this CPU ({cpu.describe()}) has neither AVX-512 nor int8 dot products (VNNI), where "
            "OpenVINO's int8 matrix products run slower than its fp32 ones"
        )
    return None


def overflow_fix() -> str:
    """NNCF's overflow fix: on a CPU without int8 dot products (VNNI; AVX-512 alone), OpenVINO multiplies
    u8 by s8 with ``vpmaddubsw``, whose 16-bit sums can saturate, so every weight keeps 7 bits; with VNNI
    none need."""
    return "disable" if cpu_info().has_int8_dot else "enable"


class StaticInt8:
    """The static int8 models of one export and one calibration, fastest first.

    ``all_in_int8`` is calibrated (cached); ``feed_forward_in_fp32`` is derived from it without
    calibrating again: each feed-forward output projection goes back to the export's fp32 weights.
    """

    def __init__(
        self, exported: ExportedModel, calibration: Calibration | None, cache: ArtifactCache
    ) -> None:
        if calibration is None:
            raise ModelLoadError("static int8 needs calibration pairs, and none were given")
        import openvino

        self._exported = exported
        self._calibration = calibration
        self._cache = cache
        self._fix = overflow_fix()
        self._key = {
            "onnx": exported.fingerprint,
            "source": exported.path.parent.name,
            "openvino": openvino.__version__,
            "nncf": importlib.metadata.version("nncf"),
            "recipe": _RECIPE,
            "higher_precision": ",".join(HIGHER_PRECISION),
            "smooth_quant_alpha": str(_SMOOTH_QUANT_ALPHA),
            "dynamic_group": str(DYNAMIC_GROUP),
            "overflow_fix": self._fix,
            "calibration": calibration.digest(),
        }
        self._fallback_key = {**self._key, "fp32": FEED_FORWARD_OUTPUT}

    def all_in_int8(self) -> Path:
        """The quantized model (its .xml; the weights lie beside it), calibrated when not cached."""
        return self._cache.get_or_build(
            "openvino-int8",
            self._key,
            "model.xml",
            lambda target: _quantize(self._exported, self._calibration, self._fix, target),
        )

    def has_fallback(self) -> bool:
        """Whether the first model has feed-forward output projections in int8 to put back in fp32: it
        has none where their node names are not BERT's."""
        import openvino

        model = openvino.Core().read_model(str(self.all_in_int8()))
        return any(_int8_feed_forward_output(op) for op in model.get_ops())

    def refused_before(self) -> str | None:
        """Why the gate refused the first model in an earlier start, when it did: then the fallback is
        cached with that reason beside it, and the first model was removed."""
        if self._cache.holds("openvino-int8", self._key, "model.xml") or not self._cache.holds(
            "openvino-int8", self._fallback_key, "model.xml"
        ):
            return None
        path = self._cache.cached("openvino-int8", self._fallback_key, "model.xml")
        try:
            return (path.parent / _REFUSAL).read_text(encoding="utf-8")
        except OSError:
            return "the parity gate refused it in an earlier start"

    def feed_forward_in_fp32(self, refused: str) -> Path:
        """The fallback model, derived from the first (calibrated when neither is cached); ``refused``
        says why the first did not serve, kept beside it for later starts."""
        if self._cache.reuse_only or self._cache.holds("openvino-int8", self._fallback_key, "model.xml"):
            return self._cache.cached("openvino-int8", self._fallback_key, "model.xml")
        quantized = self.all_in_int8()

        def derive(target: Path) -> None:
            _feed_forward_in_fp32(quantized, self._exported, target)
            (target.parent / _REFUSAL).write_text(refused, encoding="utf-8")

        return self._cache.get_or_build("openvino-int8", self._fallback_key, "model.xml", derive)

    def discard_all_in_int8(self) -> None:
        """Removes the first model, once the gate refused it, so later starts go to the fallback at once."""
        remove_entries([self._cache.entry_dir("openvino-int8", self._key)])


def _is_feed_forward_output(op: Any) -> bool:
    name = op.get_friendly_name()
    return op.get_type_name() == "MatMul" and re.fullmatch(FEED_FORWARD_OUTPUT, name) is not None


def _int8_feed_forward_output(op: Any) -> bool:
    """Whether ``op`` is a feed-forward output projection whose weights are int8 (not an fp32 constant)."""
    import openvino

    if not _is_feed_forward_output(op):
        return False
    weights = op.input_value(1).get_node()
    return not (weights.get_type_name() == "Constant" and weights.get_element_type() == openvino.Type.f32)


def _quantize(exported: ExportedModel, calibration: Calibration, fix: str, target: Path) -> None:
    import nncf
    import openvino
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        OverflowFix,
    )

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
        with _progress_bars_discarded():
            quantized = nncf.quantize(
                model,
                dataset,
                model_type=nncf.ModelType.TRANSFORMER,
                subset_size=len(calibration.rows),
                ignored_scope=nncf.IgnoredScope(patterns=kept, types=[_EMBEDDING_LOOKUP], validate=False),
                advanced_parameters=AdvancedQuantizationParameters(
                    overflow_fix=OverflowFix(fix),
                    smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=_SMOOTH_QUANT_ALPHA),
                    # Bias correction moved fidelity either way by model and measure, and took about a
                    # quarter of the calibration (benchmarks/RESULTS.md, "Static int8's two models").
                    disable_bias_correction=True,
                ),
            )
    except Exception as exc:  # NNCF raises many types for graphs it cannot handle
        raise ModelLoadError(f"NNCF could not quantize the model: {type(exc).__name__}: {exc}") from exc
    fake_quantize = _quantizers(quantized)
    if not fake_quantize:
        # Serving the fp32 graph under the int8 label would report a speed-up that is not there.
        raise ModelLoadError("NNCF could not quantize the model: it placed no int8 quantizer in the graph")
    tables = _embedding_tables_in_fp16(quantized)
    quantized, dynamic = _feed_forward_quantized_at_run_time(quantized, exported)
    logger.info(
        "static int8: %d quantizers placed, %d embedding tables in fp16, %d feed-forward output "
        "projections quantized at run time",
        fake_quantize,
        tables,
        dynamic,
    )
    openvino.save_model(quantized, str(target), compress_to_fp16=False)


def _feed_forward_quantized_at_run_time(model: Any, exported: ExportedModel) -> tuple[Any, int]:
    """Gives each feed-forward output projection the export's weights in int8 (per channel, NNCF's weight
    compression) and an activation quantized at run time, in groups of DYNAMIC_GROUP of a token's values,
    rather than through its calibrated quantizer. Returns the model and how many projections."""
    import nncf

    try:
        projections = _restore_feed_forward_outputs(model, exported)
    except ModelLoadError as exc:  # the model is left as calibrated: all static
        logger.info("%s; its feed-forward output projections keep calibrated scales", exc)
        return model, 0
    if not projections:
        return model, 0
    other_matmuls = [
        op.get_friendly_name()
        for op in model.get_ops()
        if op.get_type_name() == "MatMul" and op.get_friendly_name() not in projections
    ]
    try:
        with _progress_bars_discarded():
            model = nncf.compress_weights(
                model,
                mode=nncf.CompressWeightsMode.INT8_ASYM,
                ignored_scope=nncf.IgnoredScope(
                    names=other_matmuls,
                    types=[_EMBEDDING_LOOKUP],
                    validate=False,
                ),
            )
    except Exception as exc:  # NNCF raises many types for graphs it cannot handle
        raise ModelLoadError(f"NNCF could not compress the weights: {type(exc).__name__}: {exc}") from exc
    model.set_rt_info(str(DYNAMIC_GROUP), ["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"])
    return model, len(projections)


def _progress_bars_discarded() -> contextlib.AbstractContextManager[Any]:
    """NNCF draws progress bars on stdout whatever its log level; the sidecar's output is its logs."""
    return contextlib.redirect_stdout(io.StringIO())


def _embedding_tables_in_fp16(model: Any) -> int:
    """Stores each fp32 table a lookup gathers from in fp16, widened back to fp32 in the graph (which
    the CPU plugin folds into the lookup); a table with values past fp16's range keeps fp32. Returns
    how many tables were converted."""
    import numpy as np
    import openvino
    from openvino import opset13

    converted = 0
    for lookup in [op for op in model.get_ops() if op.get_type_name() == _EMBEDDING_LOOKUP]:
        table = lookup.input_value(0).get_node()
        if table.get_type_name() != "Constant" or table.get_element_type() != openvino.Type.f32:
            continue
        values = table.get_data()
        if np.abs(values).max(initial=0.0) > np.finfo(np.float16).max:
            continue
        stored = opset13.constant(values.astype(np.float16))
        lookup.input(0).replace_source_output(opset13.convert(stored, openvino.Type.f32).output(0))
        converted += 1
    return converted


def _feed_forward_in_fp32(quantized_path: Path, exported: ExportedModel, target: Path) -> None:
    import openvino

    model = openvino.Core().read_model(str(quantized_path))
    restored = _restore_feed_forward_outputs(model, exported)
    if not restored:
        raise ModelLoadError("static int8: no feed-forward output projection in int8 to keep in fp32")
    logger.info("static int8: %d feed-forward output projections back in fp32", len(restored))
    openvino.save_model(model, str(target), compress_to_fp16=False)


def _restore_feed_forward_outputs(model: Any, exported: ExportedModel) -> list[str]:
    """Puts each feed-forward output projection of ``model`` back to the export's: its fp32 weights, fed
    by the activation before SmoothQuant's scaling and a calibrated quantizer, where it had them (its
    bias was never changed: bias correction is off). Returns the projections' names."""
    import openvino
    from openvino import opset13

    original = {op.get_friendly_name(): op for op in openvino.Core().read_model(str(exported.path)).get_ops()}
    projections = []
    for matmul in [op for op in model.get_ops() if _is_feed_forward_output(op)]:
        export_matmul = original.get(matmul.get_friendly_name())
        weights = export_matmul.input_value(1).get_node() if export_matmul is not None else None
        if weights is None or weights.get_type_name() != "Constant":
            raise ModelLoadError(
                f"static int8: cannot restore {matmul.get_friendly_name()}'s fp32 weights from the export"
            )
        projections.append((matmul, weights))
    for matmul, weights in projections:  # each found before any is changed
        activation = matmul.input_value(0)
        if activation.get_node().get_type_name() == "FakeQuantize":
            activation = activation.get_node().input_value(0)
            if _SMOOTH_QUANT_NODE in activation.get_node().get_friendly_name():
                # The weights were scaled to match the smoothed activation: both go back to the export's.
                activation = activation.get_node().input_value(0)
            matmul.input(0).replace_source_output(activation)
        matmul.input(1).replace_source_output(opset13.constant(weights.get_data().copy()).output(0))
    model.validate_nodes_and_infer_types()
    return [matmul.get_friendly_name() for matmul, _ in projections]


def _quantizers(model: Any) -> int:
    return sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())
