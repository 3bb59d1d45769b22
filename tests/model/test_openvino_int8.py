"""Static int8 through OpenVINO and NNCF: calibrated, cached, deterministic, and dropped with a reason
when NNCF cannot quantize the model. Its fidelity on real weights is measured by benchmarks/invariance.py;
a tiny random model checks the plumbing and that int8 really ran."""

from __future__ import annotations

import dataclasses
import re

import nncf
import openvino
import pytest

from sidecar.errors import ModelLoadError
from sidecar.model.cache import ArtifactCache
from sidecar.model.engines.openvino_engine import OpenVinoEngine, openvino_precisions, static_int8_engine
from sidecar.model.engines.openvino_int8 import (
    DYNAMIC_GROUP,
    FEED_FORWARD_OUTPUT,
    StaticInt8,
    int8_withheld_reason,
    overflow_fix,
)
from sidecar.model.engines.registry import engine_spec
from sidecar.model.engines.selection import select_engine
from sidecar.model.hardware import CpuInfo
from sidecar.model.parity import compare
from tests.conditions import needs_openvino_int8
from tests.model.conftest import CROSS_ENCODER_INPUTS, engine_request


def static_int8_model(exported, calibration, cache):
    return StaticInt8(exported, calibration, cache).all_in_int8()


def int8(exported, cache, calibration) -> OpenVinoEngine:
    model = static_int8_model(exported, calibration, cache)
    return OpenVinoEngine(exported, cache, precision="int8", device="cpu", threads=1, workers=1, model=model)


@pytest.mark.parametrize(
    ("features", "offered"),
    [
        pytest.param({"avx2", "fma"}, False, id="avx2 alone"),
        pytest.param({"avx2", "avx512f"}, True, id="avx-512 without vnni"),
        pytest.param({"avx2", "avx_vnni"}, True, id="avx-vnni"),
        pytest.param({"avx2", "avx512f", "avx512_vnni"}, True, id="avx-512 vnni"),
    ],
)
def test_it_is_offered_where_openvino_has_int8_kernels_for_the_gate_to_decide(
    features: set[str], offered: bool, monkeypatch: pytest.MonkeyPatch
):
    cpu = CpuInfo("Some CPU", "x86_64", frozenset(features))
    monkeypatch.setattr("sidecar.model.engines.openvino_int8.cpu_info", lambda: cpu)
    monkeypatch.setattr("sidecar.model.engines.openvino_engine.cpu_info", lambda: cpu)

    assert ("int8" in openvino_precisions("cpu")) is offered
    reason = int8_withheld_reason()
    assert (reason is None) is offered
    assert engine_spec("openvino").withheld("cpu") == ({} if offered else {"int8": reason})
    if not offered:
        assert reason is not None
        assert "Some CPU (avx2)" in reason
        assert "neither AVX-512 nor int8 dot products" in reason


@needs_openvino_int8
def test_int8_runs_int8_and_stays_near_fp32(
    tiny_exported, artifact_cache, tiny_calibration, tiny_reference, tiny_probe
):
    engine = int8(tiny_exported, artifact_cache, tiny_calibration)
    report = compare(tiny_probe.scores(engine), tiny_probe.scores(tiny_reference), "int8")
    # It ran in int8, and no cast broke it (a broken one moves scores far more). Whether it may serve is
    # the parity gate's call, on real weights; this tiny model's are random.
    assert 0 < report.max_abs_diff < 0.1, report.describe()
    model = openvino.Core().read_model(
        str(static_int8_model(tiny_exported, tiny_calibration, artifact_cache))
    )
    quantizers = [op for op in model.get_ops() if op.get_type_name() == "FakeQuantize"]
    assert quantizers
    # The head stays in higher precision: no quantizer feeds the classifier.
    head_inputs = [
        node.get_node().get_friendly_name()
        for op in model.get_ops()
        if "/classifier/" in op.get_friendly_name()
        for node in (value.get_source_output() for value in op.inputs())
    ]
    assert head_inputs
    assert not any(name in {q.get_friendly_name() for q in quantizers} for name in head_inputs)


def test_calibration_is_deterministic_and_cached(tiny_exported, tiny_calibration, tmp_path, monkeypatch):
    first = static_int8_model(tiny_exported, tiny_calibration, ArtifactCache(tmp_path / "a"))
    second = static_int8_model(tiny_exported, tiny_calibration, ArtifactCache(tmp_path / "b"))
    assert (first.parent / "model.bin").read_bytes() == (second.parent / "model.bin").read_bytes()
    # The graphs differ only in the numbers OpenVINO appends to the names of the nodes it creates.
    graphs = [re.sub(r'_\d+(?=["/])', "", path.read_text()) for path in (first, second)]
    assert graphs[0] == graphs[1]

    def quantize_again(*args: object, **kwargs: object) -> None:
        raise AssertionError("a warm start calibrated again")

    monkeypatch.setattr(nncf, "quantize", quantize_again)
    assert static_int8_model(tiny_exported, tiny_calibration, ArtifactCache(tmp_path / "a")) == first


def test_calibrating_draws_no_progress_bars_on_stdout(tiny_exported, tiny_calibration, tmp_path, capfd):
    static_int8_model(tiny_exported, tiny_calibration, ArtifactCache(tmp_path))  # NNCF's bars discarded
    assert capfd.readouterr().out == ""


def test_another_calibration_set_is_another_artifact(tiny_exported, tiny_calibration, tmp_path):
    fewer = dataclasses.replace(tiny_calibration, rows=tiny_calibration.rows[:40])
    cache = ArtifactCache(tmp_path)
    assert static_int8_model(tiny_exported, fewer, cache) != static_int8_model(
        tiny_exported, tiny_calibration, cache
    )


def test_without_calibration_int8_does_not_load(tiny_exported, artifact_cache):
    with pytest.raises(ModelLoadError, match="static int8 needs calibration pairs"):
        int8(tiny_exported, artifact_cache, None)


def test_with_avx512_but_without_vnni_every_weight_keeps_seven_bits(monkeypatch: pytest.MonkeyPatch):
    no_vnni = CpuInfo("Intel Xeon Platinum 8175M", "x86_64", frozenset({"avx2", "avx512f", "avx512bw"}))
    monkeypatch.setattr("sidecar.model.engines.openvino_int8.cpu_info", lambda: no_vnni)
    assert overflow_fix() == "enable"
    with_vnni = CpuInfo("AMD EPYC 9B14", "x86_64", frozenset({"avx2", "avx512f", "avx512_vnni"}))
    monkeypatch.setattr("sidecar.model.engines.openvino_int8.cpu_info", lambda: with_vnni)
    assert overflow_fix() == "disable"


@needs_openvino_int8
def test_a_model_nncf_cannot_quantize_drops_the_candidate_with_the_reason(
    tmp_path, tiny_network, tiny_probe, tiny_calibration, monkeypatch
):
    def cannot(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unsupported operation in this test")

    monkeypatch.setattr(nncf, "quantize", cannot)
    request = engine_request(tmp_path, engine="openvino", precision="auto")
    selection = select_engine(
        request, tiny_network, CROSS_ENCODER_INPUTS, tiny_probe, calibration=tiny_calibration
    )
    assert selection.engine.precision != "int8"
    assert (
        "openvino/int8: failed to load: ModelLoadError: NNCF could not quantize the model: "
        "RuntimeError: unsupported operation in this test"
    ) in selection.notes


def _feed_forward_outputs(model) -> list:
    return [op for op in model.get_ops() if re.fullmatch(FEED_FORWARD_OUTPUT, op.get_friendly_name())]


def _constant_types_under(node) -> set:
    """The element types of the constants ``node`` is computed from."""
    if node.get_type_name() == "Constant":
        return {node.get_element_type()}
    return {
        kind
        for value in node.inputs()
        for kind in _constant_types_under(value.get_source_output().get_node())
    }


@needs_openvino_int8
def test_the_first_model_quantizes_feed_forward_outputs_at_run_time_and_the_fallback_has_them_in_fp32(
    tiny_exported, artifact_cache, tiny_calibration, tiny_reference, tiny_probe
):
    models = StaticInt8(tiny_exported, tiny_calibration, artifact_cache)
    core = openvino.Core()
    quantized = core.read_model(str(models.all_in_int8()))
    fallback = core.read_model(str(models.feed_forward_in_fp32("asked by the test")))
    export = {op.get_friendly_name(): op for op in core.read_model(str(tiny_exported.path)).get_ops()}
    assert _feed_forward_outputs(quantized)
    for matmul in _feed_forward_outputs(quantized):
        # No calibrated quantizer: the activation goes in as it is, the weights are int8 per channel.
        assert matmul.input_value(0).get_node().get_type_name() != "FakeQuantize"
        assert openvino.Type.u8 in _constant_types_under(matmul.input_value(1).get_node())
    # OpenVINO reads the run-time quantization's group from the model (its own default is 32).
    compiled = core.compile_model(quantized, "CPU")
    assert int(compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")) == DYNAMIC_GROUP
    assert _feed_forward_outputs(fallback)
    for matmul in _feed_forward_outputs(fallback):
        assert matmul.input_value(0).get_node().get_type_name() != "FakeQuantize"
        weights = matmul.input_value(1).get_node()
        assert weights.get_type_name() == "Constant"
        original = export[matmul.get_friendly_name()].input_value(1).get_node().get_data()
        assert (weights.get_data() == original).all()  # the export's fp32 weights, not int8 ones
    # Every calibrated quantizer stays in both.
    fallback_quantizers = sum(op.get_type_name() == "FakeQuantize" for op in fallback.get_ops())
    quantized_quantizers = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())
    assert 0 < fallback_quantizers == quantized_quantizers
    engine = OpenVinoEngine(
        tiny_exported,
        artifact_cache,
        precision="int8",
        device="cpu",
        threads=1,
        workers=1,
        model=models.feed_forward_in_fp32("asked by the test"),
    )
    report = compare(tiny_probe.scores(engine), tiny_probe.scores(tiny_reference), "int8")
    # In int8 still, and no graph edit broke it (a broken one moves scores far more); as above, whether it
    # may serve is the gate's call on real weights, and CPU classes round this random model differently.
    assert 0 < report.max_abs_diff < 0.1, report.describe()


def test_both_models_keep_the_embedding_tables_out_of_int8_stored_in_fp16(
    tiny_exported, artifact_cache, tiny_calibration
):
    models = StaticInt8(tiny_exported, tiny_calibration, artifact_cache)
    core = openvino.Core()
    export = {op.get_friendly_name(): op for op in core.read_model(str(tiny_exported.path)).get_ops()}
    for path in (models.all_in_int8(), models.feed_forward_in_fp32("asked by the test")):
        lookups = [
            op
            for op in core.read_model(str(path)).get_ops()
            if op.get_type_name() == "Gather" and "embeddings" in op.get_friendly_name()
        ]
        assert {op.get_friendly_name() for op in lookups} >= {
            name for name in export if name.endswith("word_embeddings/Gather")
        }
        for lookup in lookups:
            original = export[lookup.get_friendly_name()].input_value(0).get_node()
            if original.get_type_name() != "Constant":
                continue  # a lookup of ids, not a table
            widened = lookup.input_value(0).get_node()
            assert widened.get_type_name() == "Convert", lookup.get_friendly_name()
            table = widened.input_value(0).get_node()
            assert table.get_type_name() == "Constant"
            assert table.get_element_type() == openvino.Type.f16
            # The export's values rounded to fp16, not dequantized int8 ones.
            assert (table.get_data() == original.get_data().astype("float16")).all()


class RefusingGate:
    """The parity gate, refusing the first engine it sees (as a model whose scores static int8 with the
    feed-forward output projections in int8 moves too far)."""

    def __init__(self, probe, reference_scores) -> None:
        self.probe = probe
        self.reference_scores = reference_scores
        self.gated: list[object] = []

    def __call__(self, engine):
        self.gated.append(engine)
        report = compare(self.probe.scores(engine), self.reference_scores, engine.precision)
        return dataclasses.replace(report, spearman=0.9) if len(self.gated) == 1 else report


@needs_openvino_int8
def test_a_refused_first_model_falls_back_and_later_starts_go_straight_there(
    tiny_exported, tiny_calibration, tiny_reference, tiny_probe, tmp_path, monkeypatch
):
    def engine(model):
        return OpenVinoEngine(
            tiny_exported, cache, precision="int8", device="cpu", threads=1, workers=1, model=model
        )

    cache = ArtifactCache(tmp_path)
    models = StaticInt8(tiny_exported, tiny_calibration, cache)
    first = models.all_in_int8()
    gate = RefusingGate(tiny_probe, tiny_probe.scores(tiny_reference))
    served = static_int8_engine(models, engine, gate)
    assert len(gate.gated) == 1  # the fallback is gated by the selection, as every candidate is
    assert served.note.startswith(
        "static int8 with the feed-forward output projections in fp32; with them in int8, it failed the "
        "parity gate: "
        "max abs diff"
    )
    assert not first.exists()  # removed, so a warm start does not build and gate it again
    assert models.refused_before() == served.note.split("in int8, ", 1)[1]

    def quantize_again(*args: object, **kwargs: object) -> None:
        raise AssertionError("a later start calibrated again")

    monkeypatch.setattr(nncf, "quantize", quantize_again)
    for later in (ArtifactCache(tmp_path), ArtifactCache(tmp_path, reuse_only=True)):
        cache = later
        gate = RefusingGate(tiny_probe, tiny_probe.scores(tiny_reference))
        again = static_int8_engine(StaticInt8(tiny_exported, tiny_calibration, later), engine, gate)
        assert again.note == served.note
        assert gate.gated == []
        assert (tiny_probe.scores(again) == tiny_probe.scores(served)).all()


def int8_engines(exported, cache):
    """Builds the int8 engine of an OpenVINO model, as the sidecar's builder does."""
    return lambda model: OpenVinoEngine(
        exported, cache, precision="int8", device="cpu", threads=1, workers=1, model=model
    )


def passing_gate(probe):
    """The gate, passing every engine: this tiny model's random weights are no fidelity test."""

    def gate(engine):
        scores = probe.scores(engine)
        return compare(scores, scores, engine.precision)

    return gate


@needs_openvino_int8
def test_a_first_model_that_fails_to_run_falls_back(tiny_exported, tiny_calibration, tiny_probe, tmp_path):
    """OpenVINO has no kernel for the run-time quantized projections on some instruction sets (seen with
    oneDNN capped at AVX2 or AVX2_VNNI): it raises when the first batch runs, here the gate's."""
    cache = ArtifactCache(tmp_path)
    models = StaticInt8(tiny_exported, tiny_calibration, cache)
    first = models.all_in_int8()
    gated: list[object] = []

    def gate(engine):
        gated.append(engine)
        if len(gated) == 1:
            raise RuntimeError(
                "Exception from src/plugins/intel_cpu/src/node.cpp:823:\n[CPU] FullyConnectedCompressed node "
                "could not create a primitive descriptor\n"
            )
        return passing_gate(tiny_probe)(engine)

    served = static_int8_engine(models, int8_engines(tiny_exported, cache), gate)
    assert served.note == (
        "static int8 with the feed-forward output projections in fp32; with them in int8, it failed to "
        "run: RuntimeError: [CPU] FullyConnectedCompressed node could not create a primitive descriptor"
    )
    assert not first.exists()
    assert models.refused_before() == served.note.split("in int8, ", 1)[1]
    assert tiny_probe.scores(served).shape  # the fallback runs


@needs_openvino_int8
def test_a_first_model_that_passes_serves_and_no_fallback_is_made(
    tiny_exported, tiny_calibration, tiny_reference, tiny_probe, tmp_path
):
    cache = ArtifactCache(tmp_path)
    models = StaticInt8(tiny_exported, tiny_calibration, cache)
    served = static_int8_engine(models, int8_engines(tiny_exported, cache), passing_gate(tiny_probe))
    assert served.note == ""
    int8_entries = [entry for entry in tmp_path.iterdir() if entry.name.startswith("openvino-int8-")]
    assert len(int8_entries) == 1  # the first model alone: no fallback derived
    assert models.refused_before() is None


@needs_openvino_int8
def test_the_selection_gates_static_int8_once_and_notes_a_fallback(
    tmp_path, tiny_network, tiny_probe, tiny_calibration, monkeypatch
):
    from sidecar.model.engines import selection

    gated: list[str] = []
    real_compare = selection.compare

    def refusing_the_first_int8(scores, reference, precision):
        """The gate, refusing the first static int8 model and passing the next (this tiny model's random
        weights are no fidelity test)."""
        report = real_compare(scores, reference, precision)
        if precision == "int8":
            gated.append(precision)
            fidelity = {"spearman": 0.9} if len(gated) == 1 else {"spearman": 1.0, "max_abs_diff": 0.0}
            return dataclasses.replace(report, top_kept=10, **fidelity)
        return report

    monkeypatch.setattr(selection, "compare", refusing_the_first_int8)
    request = engine_request(tmp_path, engine="openvino", precision="int8")
    chosen = select_engine(
        request, tiny_network, CROSS_ENCODER_INPUTS, tiny_probe, calibration=tiny_calibration
    )
    assert chosen.engine.precision == "int8"
    # The first model refused while it was built; the fallback gated once, by the selection.
    assert len(gated) == 2
    assert any(
        note.startswith("openvino/int8: static int8 with the feed-forward output projections in fp32")
        for note in chosen.notes
    ), chosen.notes
