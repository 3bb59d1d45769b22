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
from sidecar.model.engines.openvino_engine import OpenVinoEngine, openvino_precisions
from sidecar.model.engines.openvino_int8 import overflow_fix, static_int8_model
from sidecar.model.engines.selection import EngineRequest, select_engine
from sidecar.model.hardware import CpuInfo
from sidecar.model.parity import compare
from tests.model.conftest import CROSS_ENCODER_INPUTS


def int8(exported, cache, calibration) -> OpenVinoEngine:
    return OpenVinoEngine(
        exported, cache, precision="int8", device="cpu", threads=1, workers=1, calibration=calibration
    )


def test_it_is_offered_on_every_cpu_for_the_gate_to_decide():
    assert openvino_precisions("cpu")[0] == "int8"


def test_int8_runs_int8_and_stays_near_fp32(
    tiny_exported, artifact_cache, tiny_calibration, tiny_reference, tiny_probe
):
    engine = int8(tiny_exported, artifact_cache, tiny_calibration)
    report = compare(tiny_probe.scores(engine), tiny_probe.scores(tiny_reference), "int8")
    assert 0 < report.max_abs_diff < 0.05, report.describe()  # it ran in int8, and no cast broke it
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
    graphs = [re.sub(r'_\d+"', '"', path.read_text()) for path in (first, second)]
    assert graphs[0] == graphs[1]

    def quantize_again(*args: object, **kwargs: object) -> None:
        raise AssertionError("a warm start calibrated again")

    monkeypatch.setattr(nncf, "quantize", quantize_again)
    assert static_int8_model(tiny_exported, tiny_calibration, ArtifactCache(tmp_path / "a")) == first


def test_another_calibration_set_is_another_artifact(tiny_exported, tiny_calibration, tmp_path):
    fewer = dataclasses.replace(tiny_calibration, rows=tiny_calibration.rows[:40])
    cache = ArtifactCache(tmp_path)
    assert static_int8_model(tiny_exported, fewer, cache) != static_int8_model(
        tiny_exported, tiny_calibration, cache
    )


def test_without_calibration_int8_does_not_load(tiny_exported, artifact_cache):
    with pytest.raises(ModelLoadError, match="static int8 needs calibration pairs"):
        int8(tiny_exported, artifact_cache, None)


def test_without_vnni_every_weight_keeps_seven_bits(monkeypatch: pytest.MonkeyPatch):
    no_vnni = CpuInfo("AMD EPYC 7B12", "x86_64", frozenset({"avx2", "fma"}))
    monkeypatch.setattr("sidecar.model.engines.openvino_int8.cpu_info", lambda: no_vnni)
    assert overflow_fix() == "enable"
    with_vnni = CpuInfo("AMD EPYC 9B14", "x86_64", frozenset({"avx2", "avx512f", "avx512_vnni"}))
    monkeypatch.setattr("sidecar.model.engines.openvino_int8.cpu_info", lambda: with_vnni)
    assert overflow_fix() == "disable"


def test_a_model_nncf_cannot_quantize_drops_the_candidate_with_the_reason(
    tmp_path, tiny_network, tiny_probe, tiny_calibration, monkeypatch
):
    def cannot(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unsupported operation in this test")

    monkeypatch.setattr(nncf, "quantize", cannot)
    request = EngineRequest(
        engine="openvino",
        precision="auto",
        device="cpu",
        threads=1,
        max_batch_pairs=8,
        max_batch_tokens=1024,
        max_length=128,
        cache_dir=tmp_path,
        torch_compile="off",
    )
    selection = select_engine(
        request, tiny_network, CROSS_ENCODER_INPUTS, tiny_probe, calibration=tiny_calibration
    )
    assert selection.engine.precision != "int8"
    assert (
        "openvino/int8: failed to load: ModelLoadError: NNCF could not quantize the model: "
        "RuntimeError: unsupported operation in this test"
    ) in selection.notes
