"""The remembered engine choice: a restart loads and gates only the chosen engine, and selects again
when anything the choice depends on changed or the remembered engine no longer passes."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from rerank.v1 import rerank_pb2
from sidecar.model.engines import selection as selection_module
from sidecar.model.engines.onnxruntime_engine import OnnxRuntimeEngine
from sidecar.model.engines.selection import EngineRequest, select_engine, verdict_key
from sidecar.model.engines.verdict import Verdict, VerdictStore
from sidecar.model.parity import cross_encoder_probe
from sidecar.model.phases import PhaseTimer
from tests.conftest import running_sidecar
from tests.model.conftest import CROSS_ENCODER_INPUTS


def request(tmp_path: Path, **overrides: object) -> EngineRequest:
    options: dict[str, object] = {
        "engine": "auto",
        "precision": "auto",
        "device": "cpu",
        "threads": 1,
        "max_batch_pairs": 8,
        "max_batch_tokens": 1024,
        "max_length": 128,
        "cache_dir": tmp_path,
        "torch_compile": "off",
        "workers": 1,
    }
    return EngineRequest(**{**options, **overrides})  # type: ignore[arg-type]


def count_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    built: list[str] = []
    original = selection_module._Builder.build

    def build(self, candidate):
        built.append(str(candidate))
        return original(self, candidate)

    monkeypatch.setattr(selection_module._Builder, "build", build)
    return built


def test_a_restart_loads_and_gates_only_the_remembered_engine(
    tmp_path, tiny_network, tiny_probe, monkeypatch
):
    first = select_engine(request(tmp_path), tiny_network, CROSS_ENCODER_INPUTS, tiny_probe)
    assert not first.from_cache
    assert len(first.timings) >= 2  # every candidate that passed was timed
    built = count_builds(monkeypatch)
    phases = PhaseTimer()
    second = select_engine(request(tmp_path), tiny_network, CROSS_ENCODER_INPUTS, tiny_probe, phases)
    assert second.from_cache
    served = f"{second.engine.name}/{second.engine.precision}"
    assert served == f"{first.engine.name}/{first.engine.precision}"
    assert built == [served]
    assert second.parity.passed
    assert second.notes == first.notes
    assert second.timings == pytest.approx(first.timings)
    assert "timing" not in phases.seconds  # nothing was timed again


def test_a_choice_made_while_a_candidate_failed_for_the_machine_is_not_remembered(
    tmp_path, tiny_network, tiny_probe, monkeypatch, caplog
):
    # A full cache disk fails the exports: torch wins then, but only for as long as the disk is full.
    def disk_full(self: object, *args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(OnnxRuntimeEngine, "__init__", disk_full)
        with caplog.at_level(logging.WARNING):
            first = select_engine(request(tmp_path), tiny_network, CROSS_ENCODER_INPUTS, tiny_probe)
    assert first.engine.name != "onnxruntime"
    assert "so the next start selects again:" in caplog.text
    assert "onnxruntime/fp32 (OSError: [Errno 28] No space left on device)" in caplog.text
    second = select_engine(request(tmp_path), tiny_network, CROSS_ENCODER_INPUTS, tiny_probe)
    assert not second.from_cache  # selected again, onnxruntime among the candidates, and now remembered
    assert select_engine(request(tmp_path), tiny_network, CROSS_ENCODER_INPUTS, tiny_probe).from_cache


def test_changed_settings_select_again_and_say_which(tmp_path, tiny_network, tiny_probe, caplog):
    select_engine(request(tmp_path), tiny_network, CROSS_ENCODER_INPUTS, tiny_probe)
    with caplog.at_level(logging.INFO, logger="sidecar.model.engines.selection"):
        again = select_engine(request(tmp_path, threads=2), tiny_network, CROSS_ENCODER_INPUTS, tiny_probe)
    assert not again.from_cache
    assert "threads '1' -> '2'" in caplog.text


def test_a_choice_gated_on_another_probe_is_made_again(
    tmp_path, tiny_model, tiny_network, tiny_probe, caplog
):
    """A verdict remembered before the probe changed (the vocabulary sweep was added) holds reference
    scores for other rows: it must not be reused, and the log says the probe changed."""
    former_probe = cross_encoder_probe(tiny_model, max_batch_pairs=32, vocab_size=1000)
    select_engine(request(tmp_path), tiny_network, CROSS_ENCODER_INPUTS, former_probe)
    with caplog.at_level(logging.INFO, logger="sidecar.model.engines.selection"):
        again = select_engine(request(tmp_path), tiny_network, CROSS_ENCODER_INPUTS, tiny_probe)
    assert not again.from_cache
    assert f"probe '{former_probe.digest()}' -> '{tiny_probe.digest()}'" in caplog.text
    assert again.parity.passed


def test_reselect_ignores_the_remembered_choice(tmp_path, tiny_network, tiny_probe, monkeypatch):
    select_engine(request(tmp_path), tiny_network, CROSS_ENCODER_INPUTS, tiny_probe)
    built = count_builds(monkeypatch)
    again = select_engine(request(tmp_path, reselect=True), tiny_network, CROSS_ENCODER_INPUTS, tiny_probe)
    assert not again.from_cache
    assert len(built) >= 2


def test_a_remembered_engine_that_fails_the_gate_sends_the_start_through_selection(
    tmp_path, tiny_network, tiny_probe, monkeypatch, caplog
):
    pinned = request(tmp_path, engine="onnxruntime", precision="fp32")
    assert select_engine(pinned, tiny_network, CROSS_ENCODER_INPUTS, tiny_probe).engine.name == "onnxruntime"

    def wrong(self, batch) -> np.ndarray:
        return np.zeros((batch.shape[0], 1), dtype=np.float32)

    monkeypatch.setattr(OnnxRuntimeEngine, "forward", wrong)
    # The full selection then fails too, as the engine named explicitly would serve wrong scores.
    with caplog.at_level(logging.INFO), pytest.raises(Exception, match="failed the parity gate"):
        select_engine(pinned, tiny_network, CROSS_ENCODER_INPUTS, tiny_probe)
    assert "the remembered onnxruntime/fp32 failed the parity gate" in caplog.text


def test_a_corrupt_verdict_file_is_reported_and_replaced(tmp_path, tiny_network, tiny_probe, caplog):
    select_engine(request(tmp_path), tiny_network, CROSS_ENCODER_INPUTS, tiny_probe)
    (path,) = (tmp_path / "verdicts").glob("*.json")
    path.write_text("{not json")
    with caplog.at_level(logging.INFO, logger="sidecar.model.engines.selection"):
        again = select_engine(request(tmp_path), tiny_network, CROSS_ENCODER_INPUTS, tiny_probe)
    assert not again.from_cache
    assert "is unreadable" in caplog.text
    assert json.loads(path.read_text())["verdict"]["engine"] == again.engine.name


def test_the_key_names_the_hardware_and_libraries(tmp_path, tiny_network, tiny_probe):
    select_engine(request(tmp_path), tiny_network, CROSS_ENCODER_INPUTS, tiny_probe)
    (path,) = (tmp_path / "verdicts").glob("*.json")
    key = json.loads(path.read_text())["key"]
    assert {"model", "probe", "cpu", "cpu_features", "torch", "onnxruntime", "threads", "workers"} <= set(key)
    assert {"max_length", "max_batch_tokens", "max_batch_pairs", "lossy_margin", "nncf"} <= set(key)


def test_another_calibration_set_selects_again(tmp_path, tiny_probe, tiny_calibration):
    model_hash = "0" * 64
    packaged = verdict_key(request(tmp_path), model_hash, tiny_probe, tiny_calibration)
    fewer = dataclasses.replace(tiny_calibration, rows=tiny_calibration.rows[:10])
    other = verdict_key(request(tmp_path), model_hash, tiny_probe, fewer)
    changed = {name for name in packaged if packaged[name] != other[name]}
    assert changed == {"calibration"}


def test_recall_names_each_changed_field(tmp_path):
    store = VerdictStore(tmp_path)
    timings = {"torch/bf16": 20.0, "torch/fp32": 10.0}
    verdict = Verdict("torch", "bf16", timings, 2.0, ("a note",), (0.25, 0.75))
    absent = (None, "no choice is remembered for this model and device")
    assert store.recall("abc", "cpu", {"cpu": "A"}) == absent
    store.remember("abc", "cpu", {"cpu": "A", "threads": "1"}, verdict)
    assert store.recall("abc", "cpu", {"cpu": "A", "threads": "1"}) == (verdict, "")
    recalled, why = store.recall("abc", "cpu", {"cpu": "B", "threads": "1"})
    assert recalled is None
    assert why == "the remembered choice was made for other conditions: cpu 'A' -> 'B'"
    assert store.recall("abc", "cuda:0", {"cpu": "A", "threads": "1"})[0] is None  # one file per device


async def test_info_says_when_the_choice_was_remembered(tiny_bert: Path, tmp_path: Path):
    options = {"engine": "auto", "precision": "auto", "cache_dir": str(tmp_path), "lossy_margin": 0.25}
    async with running_sidecar(tiny_bert, **options) as sidecar:
        first = await sidecar.stub.Info(rerank_pb2.InfoRequest())
    async with running_sidecar(tiny_bert, **options) as sidecar:
        second = await sidecar.stub.Info(rerank_pb2.InfoRequest())
    assert not first.selection.from_cache
    assert second.selection.from_cache
    assert (second.engine, second.precision) == (first.engine, first.precision)
    assert second.selection.lossy_margin == pytest.approx(0.25)
    assert {timing.candidate for timing in second.selection.timings} == {
        timing.candidate for timing in first.selection.timings
    }
    assert len(first.selection.timings) >= 2
    assert "(" in first.selection.hardware  # "<CPU model> (<ISA class>)"
