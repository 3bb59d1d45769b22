from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from rerank.v1 import rerank_pb2
from sidecar.errors import ModelLoadError
from sidecar.model.engines.base import Engine
from sidecar.model.engines.onnxruntime_engine import OnnxRuntimeEngine
from sidecar.model.engines.openvino_engine import OpenVinoEngine
from sidecar.model.engines.registry import Offer, Unavailable
from sidecar.model.engines.selection import (
    EngineCandidate,
    choose,
    plan_candidates,
    select_engine,
    throughputs,
)
from sidecar.model.engines.torch_engine import TorchEngine
from tests.conditions import needs_openvino_int8
from tests.conftest import running_sidecar
from tests.model.conftest import CROSS_ENCODER_INPUTS, engine_request
from tests.models import padded_batch

NO_TENSORRT = "TensorRT needs a CUDA device; the device is cpu"
NO_OPENVINO = "OpenVINO runs on the CPU here; the device is cuda"
CPU_OFFERS: dict[str, Offer] = {
    "tensorrt": Unavailable(NO_TENSORRT),
    "onnxruntime": ("int8", "fp32"),
    "openvino": ("bf16", "fp32"),
    "torch": ("bf16", "fp32"),
}
GPU_OFFERS: dict[str, Offer] = {
    "tensorrt": ("fp16", "fp32"),
    "onnxruntime": ("fp32",),
    "openvino": Unavailable(NO_OPENVINO),
    "torch": ("fp16", "bf16", "fp32"),
}


def labels(candidates) -> list[str]:
    return [str(candidate) for candidate in candidates]


def test_auto_on_a_cpu_skips_tensorrt_and_says_why():
    candidates, notes = plan_candidates("auto", "auto", CPU_OFFERS)
    assert labels(candidates) == [
        "onnxruntime/int8",
        "onnxruntime/fp32",
        "openvino/bf16",
        "openvino/fp32",
        "torch/bf16",
        "torch/fp32",
    ]
    assert notes == [f"tensorrt: unavailable: {NO_TENSORRT}"]


def test_auto_on_a_gpu_tries_tensorrt_first():
    candidates, _ = plan_candidates("auto", "auto", GPU_OFFERS)
    assert labels(candidates)[0] == "tensorrt/fp16"
    candidates, notes = plan_candidates("auto", "fp16", GPU_OFFERS)
    assert labels(candidates) == ["tensorrt/fp16", "torch/fp16"]
    assert notes == [
        "onnxruntime: does not run fp16 here (it runs fp32)",
        f"openvino: unavailable: {NO_OPENVINO}",
    ]


def test_a_fixed_precision_keeps_the_chain_order():
    candidates, _ = plan_candidates("auto", "fp32", CPU_OFFERS)
    assert labels(candidates) == ["onnxruntime/fp32", "openvino/fp32", "torch/fp32"]


def test_an_explicit_engine_that_cannot_run_is_an_error_not_a_fallback():
    with pytest.raises(ModelLoadError, match=r"tensorrt engine cannot run.*CUDA device"):
        plan_candidates("tensorrt", "auto", CPU_OFFERS)
    with pytest.raises(ModelLoadError, match="torch engine cannot run precision int8"):
        plan_candidates("torch", "int8", CPU_OFFERS)
    with pytest.raises(ModelLoadError, match="any engine cannot run precision fp16"):
        plan_candidates("auto", "fp16", CPU_OFFERS)


def fail_to_load(monkeypatch: pytest.MonkeyPatch, *engines: type[Engine]) -> None:
    """Make the given engines (by default every compiled CPU engine) fail to load."""
    for engine in engines or (OnnxRuntimeEngine, OpenVinoEngine):

        def broken(self, *args: object, name: str = engine.name, **kwargs: object) -> None:
            raise ModelLoadError(f"{name} is broken in this test")

        monkeypatch.setattr(engine, "__init__", broken)


BROKEN_NOTES = [
    "onnxruntime/fp32: failed to load: ModelLoadError: onnxruntime is broken in this test",
    "openvino/fp32: failed to load: ModelLoadError: openvino is broken in this test",
]


def test_without_tensorrt_auto_serves_onnxruntime(tmp_path, tiny_network, tiny_probe):
    selection = select_engine(engine_request(tmp_path), tiny_network, CROSS_ENCODER_INPUTS, tiny_probe)
    assert (selection.engine.name, selection.engine.precision) == ("onnxruntime", "fp32")
    assert selection.engine.compiled
    assert selection.parity.passed
    assert selection.notes == ["tensorrt: unavailable: TensorRT needs a CUDA device; the device is cpu"]


def test_with_the_compiled_engines_failing_auto_serves_torch(tmp_path, tiny_network, tiny_probe, monkeypatch):
    fail_to_load(monkeypatch)
    selection = select_engine(engine_request(tmp_path), tiny_network, CROSS_ENCODER_INPUTS, tiny_probe)
    assert (selection.engine.name, selection.engine.precision) == ("torch", "fp32")
    assert selection.notes[1:] == BROKEN_NOTES


def test_with_onnxruntime_failing_auto_moves_down_the_chain(tmp_path, tiny_network, tiny_probe, monkeypatch):
    fail_to_load(monkeypatch, OnnxRuntimeEngine)
    selection = select_engine(engine_request(tmp_path), tiny_network, CROSS_ENCODER_INPUTS, tiny_probe)
    assert (selection.engine.name, selection.engine.precision) == ("openvino", "fp32")
    assert selection.notes[1:] == BROKEN_NOTES[:1]


def test_an_engine_failing_the_parity_gate_is_skipped(tmp_path, tiny_network, tiny_probe, monkeypatch):
    def wrong(self, batch) -> np.ndarray:
        return np.random.default_rng(0).normal(size=(batch.shape[0], 1)).astype(np.float32)

    monkeypatch.setattr(OnnxRuntimeEngine, "forward", wrong)
    selection = select_engine(engine_request(tmp_path), tiny_network, CROSS_ENCODER_INPUTS, tiny_probe)
    assert selection.engine.name == "openvino"  # the next in the chain
    assert selection.notes[1].startswith("onnxruntime/fp32: failed the parity gate: max abs diff")


def test_an_explicit_engine_that_fails_is_an_error(tmp_path, tiny_network, tiny_probe, monkeypatch):
    fail_to_load(monkeypatch)
    with pytest.raises(ModelLoadError, match="requested engine onnxruntime/fp32 could not load"):
        select_engine(
            engine_request(tmp_path, engine="onnxruntime"), tiny_network, CROSS_ENCODER_INPUTS, tiny_probe
        )


def test_precision_auto_serves_a_passing_candidate_and_notes_the_slower_ones(
    tmp_path, tiny_network, tiny_probe
):
    selection = select_engine(
        engine_request(tmp_path, precision="auto"), tiny_network, CROSS_ENCODER_INPUTS, tiny_probe
    )
    served = f"{selection.engine.name}/{selection.engine.precision}"
    assert selection.parity.passed
    slower = [note for note in selection.notes if "slower here" in note]
    assert slower, selection.notes
    assert all(f"for {served})" in note for note in slower)
    assert not any(note.startswith(served) for note in selection.notes)


async def test_info_reports_why_engines_were_skipped(tiny_bert: Path, tmp_path: Path, monkeypatch):
    fail_to_load(monkeypatch)
    async with running_sidecar(
        tiny_bert, engine="auto", precision="fp32", cache_dir=str(tmp_path)
    ) as sidecar:
        info = await sidecar.stub.Info(rerank_pb2.InfoRequest())
    assert (info.engine, info.precision, info.device) == ("torch", "fp32", "cpu")
    assert not info.compiled  # the test sidecar runs --torch-compile off
    assert list(info.engine_notes) == [
        "tensorrt: unavailable: TensorRT needs a CUDA device; the device is cpu",
        *BROKEN_NOTES,
    ]


async def test_info_says_the_serving_engine_is_compiled(tiny_bert: Path, tmp_path: Path):
    async with running_sidecar(
        tiny_bert, engine="auto", precision="fp32", cache_dir=str(tmp_path)
    ) as sidecar:
        info = await sidecar.stub.Info(rerank_pb2.InfoRequest())
    assert (info.engine, info.precision) == ("onnxruntime", "fp32")
    assert info.compiled


def test_torch_compile_compiles_the_winner_and_gates_it_again(tmp_path, tiny_network, tiny_probe):
    selection = select_engine(
        engine_request(tmp_path, engine="torch", torch_compile="on"),
        tiny_network,
        CROSS_ENCODER_INPUTS,
        tiny_probe,
    )
    assert isinstance(selection.engine, TorchEngine)
    assert selection.engine.compiled
    assert selection.parity.passed
    assert selection.parity.max_abs_diff < 1e-4


def break_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no C++ compiler in this test")

    monkeypatch.setattr(torch, "compile", broken)


def test_a_failed_compile_under_auto_serves_uncompiled_and_says_why(
    tmp_path, tiny_network, tiny_probe, monkeypatch
):
    break_compile(monkeypatch)
    wanted = engine_request(tmp_path, engine="torch", torch_compile="auto")
    selection = select_engine(wanted, tiny_network, CROSS_ENCODER_INPUTS, tiny_probe)
    assert isinstance(selection.engine, TorchEngine)
    assert not selection.engine.compiled
    assert selection.upgrade is not None  # auto compiles after the server serves
    assert selection.upgrade() is None
    assert selection.notes == [
        "torch/fp32 compiled: RuntimeError: no C++ compiler in this test; it runs uncompiled"
    ]


def test_a_failed_compile_when_asked_for_is_an_error(tmp_path, tiny_network, tiny_probe, monkeypatch):
    break_compile(monkeypatch)
    with pytest.raises(ModelLoadError, match="--torch-compile on: compiling torch/fp32 failed"):
        select_engine(
            engine_request(tmp_path, engine="torch", torch_compile="on"),
            tiny_network,
            CROSS_ENCODER_INPUTS,
            tiny_probe,
        )


def candidates_of(*labels: str) -> list[EngineCandidate]:
    return [EngineCandidate(*label.split("/")) for label in labels]


def every_one_passes(gated: list[int]) -> Callable[[int], bool]:
    def passes(index: int) -> bool:
        gated.append(index)
        return True

    return passes


def test_a_lossy_precision_serves_only_past_the_margin(tmp_path):
    wanted = engine_request(tmp_path, precision="auto")  # --lossy-margin 0.15 by default
    ranked = candidates_of("onnxruntime/int8", "onnxruntime/fp32", "torch/bf16", "torch/fp32")
    notes: list[str] = []
    gated: list[int] = []
    best, speedup = choose(ranked, [11.0, 10.0, 10.5, 9.0], wanted, every_one_passes(gated), notes)
    assert (str(ranked[best]), speedup) == ("onnxruntime/fp32", 1.0)
    assert gated == [1]  # neither lossy candidate is 15% faster: only the lossless one that serves
    assert notes[0].startswith("onnxruntime/int8: faster (11.0 rows/s against 10.0 for onnxruntime/fp32)")
    assert notes[0].endswith("15% faster than lossless (--lossy-margin); not gated")
    assert notes[2] == "torch/fp32: slower here (9.0 rows/s against 10.0 for onnxruntime/fp32); not gated"
    gated.clear()
    best, speedup = choose(ranked, [12.0, 10.0, 10.5, 9.0], wanted, every_one_passes(gated), notes := [])
    assert (str(ranked[best]), speedup) == ("onnxruntime/int8", pytest.approx(1.2))
    assert gated == [0]  # only the one that serves
    assert notes == [
        "torch/bf16: slower here (10.5 rows/s against 12.0 for onnxruntime/int8); not gated",
        "onnxruntime/fp32: slower here (10.0 rows/s against 12.0 for onnxruntime/int8); not gated",
        "torch/fp32: slower here (9.0 rows/s against 12.0 for onnxruntime/int8); not gated",
    ]


def test_lossy_candidates_past_the_margin_are_gated_first_fastest_first(tmp_path):
    wanted = engine_request(tmp_path, precision="auto")
    ranked = candidates_of(
        "openvino/int8", "openvino/bf16", "openvino/fp32", "onnxruntime/fp32", "torch/fp32"
    )
    gated: list[int] = []

    def passes(index: int) -> bool:  # int8 and OpenVINO's fp32 fail the gate
        gated.append(index)
        return index not in (0, 2)

    best, speedup = choose(ranked, [40.0, 30.0, 16.0, 14.0, 13.0], wanted, passes, [])
    assert str(ranked[best]) == "openvino/bf16"
    assert speedup == pytest.approx(30.0 / 16.0)  # over the fastest lossless candidate
    assert gated == [0, 1]  # no lossless candidate needed gating: none would serve


def test_when_the_fastest_lossless_candidate_fails_the_next_one_sets_the_margin(tmp_path):
    wanted = engine_request(tmp_path, precision="auto")
    ranked = candidates_of("openvino/int8", "openvino/fp32", "onnxruntime/fp32")
    gated: list[int] = []

    def passes(index: int) -> bool:  # OpenVINO's fp32 fails the gate
        gated.append(index)
        return index != 1

    # int8 is not 15% faster than OpenVINO's fp32, which would serve, but fails; against ONNX Runtime's
    # it is, so it serves.
    best, speedup = choose(ranked, [17.0, 16.0, 14.0], wanted, passes, notes := [])
    assert (str(ranked[best]), speedup) == ("openvino/int8", pytest.approx(17.0 / 14.0))
    assert gated == [1, 0]
    assert notes == ["onnxruntime/fp32: slower here (14.0 rows/s against 17.0 for openvino/int8); not gated"]


def test_with_no_lossless_candidate_the_fastest_lossy_serves(tmp_path):
    ranked = candidates_of("onnxruntime/int8", "torch/bf16")
    gated: list[int] = []
    best, speedup = choose(
        ranked, [10.0, 12.0], engine_request(tmp_path, precision="auto"), every_one_passes(gated), []
    )
    assert (str(ranked[best]), speedup) == ("torch/bf16", 0.0)
    assert gated == [1]


def test_when_no_candidate_passes_none_serves(tmp_path):
    ranked = candidates_of("onnxruntime/int8", "onnxruntime/fp32")
    with pytest.raises(ModelLoadError, match="no engine passed the parity gate"):
        choose(ranked, [12.0, 10.0], engine_request(tmp_path, precision="auto"), lambda index: False, [])


class SleepingEngine(Engine):
    name = "sleeping"

    def __init__(self, seconds: float) -> None:
        super().__init__(precision="fp32", device="cpu")
        self.seconds = seconds
        self.calls = 0

    def forward(self, batch) -> np.ndarray:
        self.calls += 1
        time.sleep(self.seconds)
        return np.zeros((batch.shape[0], 1), dtype=np.float32)


def test_timing_stops_for_a_candidate_clearly_behind_unless_it_leads_its_group():
    fast, slow, slow_lossy_leader = SleepingEngine(0.01), SleepingEngine(0.03), SleepingEngine(0.04)
    batch = padded_batch(2, 8, seed=0)
    timed = throughputs([fast, slow, slow_lossy_leader], batch, groups=[False, False, True])
    assert fast.calls == slow_lossy_leader.calls == 4  # a warm-up and three rounds
    assert slow.calls == 2  # the warm-up and the first round
    assert [throughput.rounds for throughput in timed] == [3, 1, 3]
    assert timed[0].rows_per_s > timed[1].rows_per_s > timed[2].rows_per_s


def test_finding_each_groups_fastest_ends_once_each_group_has_one_left():
    fast, slow, lossy = SleepingEngine(0.01), SleepingEngine(0.03), SleepingEngine(0.02)
    batch = padded_batch(2, 8, seed=0)
    throughputs([fast, slow, lossy], batch, [False, False, True], group_leaders_only=True)
    assert (fast.calls, slow.calls, lossy.calls) == (2, 2, 2)  # a warm-up and one round decided it
    close_one, close_other = SleepingEngine(0.02), SleepingEngine(0.021)
    throughputs([close_one, close_other], batch, group_leaders_only=True)
    assert close_one.calls == close_other.calls == 4  # too close to call: every round


def test_an_engine_timed_before_is_not_warmed_up_again():
    timed_before, new = SleepingEngine(0.01), SleepingEngine(0.01)
    # Each leads a group of its own, so neither leaves the race when a loaded machine delays one.
    batch = padded_batch(2, 8, seed=0)
    throughputs([timed_before, new], batch, groups=[False, True], warm=[True, False])
    assert (timed_before.calls, new.calls) == (3, 4)


def test_warm_ups_run_side_by_side_after_one_row_of_each_library_alone_and_rounds_one_at_a_time():
    together = threading.Barrier(2, timeout=30)
    calls: list[tuple[Engine, int, float, float]] = []  # engine, rows, start, end
    batch = padded_batch(4, 8, seed=0)

    class Recorded(Engine):
        """Records its forwards; the first full batches of ``meets`` engines wait for each other, so they
        must run at once."""

        def __init__(self, meets: bool) -> None:
            super().__init__(precision="fp32", device="cpu")
            self.meets = meets

        def forward(self, batch) -> np.ndarray:
            started = time.perf_counter()
            warm_up = batch.shape[0] > 1 and not any(call[0] is self and call[1] > 1 for call in calls)
            if self.meets and warm_up:
                together.wait()
            time.sleep(0.01)
            calls.append((self, batch.shape[0], started, time.perf_counter()))
            return np.zeros((batch.shape[0], 1), dtype=np.float32)

    class OneLibrary(Recorded):
        name = "one-library"

    class AnotherLibrary(Recorded):
        name = "another-library"

    engines = [OneLibrary(meets=True), OneLibrary(meets=True), AnotherLibrary(meets=False)]
    throughputs(engines, batch, side_by_side=2)
    one_rows = [call for call in calls if call[1] == 1]
    assert [type(call[0]) for call in one_rows] == [OneLibrary, AnotherLibrary]  # one each, first
    assert max(call[3] for call in one_rows) <= min(call[2] for call in calls if call[1] > 1)
    full = [call for call in calls if call[1] > 1]
    warm_ups = [next(call for call in full if call[0] is engine) for engine in engines]
    rounds = sorted((call for call in full if call not in warm_ups), key=lambda call: call[2])
    assert len(rounds) == 9  # three rounds each, all close
    assert all(earlier[3] <= later[2] for earlier, later in itertools.pairwise(rounds))
    assert max(call[3] for call in warm_ups) <= rounds[0][2]


async def test_torch_compile_auto_serves_at_once_then_the_compiled_engine_takes_over(
    tiny_bert: Path, tmp_path: Path
):
    request = rerank_pb2.RerankRequest(
        query="what do cats eat",
        documents=[
            rerank_pb2.Document(id="a", text="Cats are obligate carnivores."),
            rerank_pb2.Document(id="b", text="The stock market fell on Tuesday."),
            rerank_pb2.Document(id="c", text="Kittens drink their mother's milk, then eat meat."),
        ],
    )
    options = {"engine": "torch", "precision": "fp32", "torch_compile": "auto", "cache_dir": str(tmp_path)}
    async with running_sidecar(tiny_bert, **options) as sidecar:
        assert not (await sidecar.stub.Info(rerank_pb2.InfoRequest())).compiled  # serving before compiling
        before = await sidecar.stub.Rerank(request)
        deadline = time.monotonic() + 240
        while not (info := await sidecar.stub.Info(rerank_pb2.InfoRequest())).compiled:
            assert time.monotonic() < deadline, "the compiled engine never took over"
            await asyncio.sleep(0.5)
        after = await sidecar.stub.Rerank(request)
    assert (info.engine, info.precision) == ("torch", "fp32")
    assert list(info.engine_notes) == []  # the compile passed its gate
    assert [result.id for result in after.results] == [result.id for result in before.results]
    np.testing.assert_allclose(
        [result.score for result in after.results], [result.score for result in before.results], atol=1e-5
    )


def test_on_cuda_torch_is_compiled_for_shape_buckets_before_serving(
    tmp_path, tiny_network, tiny_probe, monkeypatch
):
    # A CPU stand-in for a CUDA device without TensorRT: the torch spec and the compiled engine are
    # built on the CPU, everything else takes the CUDA path.
    from sidecar.model.batch import ShapeBuckets
    from sidecar.model.engines import selection as selection_module
    from sidecar.model.engines import torch_compiled, torch_engine
    from sidecar.model.engines.registry import EngineSpec
    from sidecar.model.engines.torch_buckets import BucketedTorchEngine

    built: list[ShapeBuckets] = []

    def compiled_on_the_cpu(network, *, precision, shape, sample, input_names):
        buckets = ShapeBuckets(shape.max_batch_pairs, shape.max_batch_tokens, shape.max_length)
        built.append(buckets)
        return BucketedTorchEngine(
            network, precision=precision, device="cpu", buckets=buckets, input_names=input_names
        )

    eager = EngineSpec(
        "torch", lambda device: ("fp32",), lambda inputs, shape, p: TorchEngine(inputs.network)
    )
    monkeypatch.setattr(torch_engine, "SPEC", eager)
    monkeypatch.setattr(torch_compiled, "compiled_torch_engine", compiled_on_the_cpu)
    monkeypatch.setattr(selection_module, "device_fingerprint", lambda device: {"gpu": "stand-in"})
    # The probe's batches: up to 32 pairs of up to 512 tokens.
    limits = {"max_batch_pairs": 32, "max_batch_tokens": 2048, "max_length": 512}
    on_cuda = dataclasses.replace(engine_request(tmp_path, "auto", "auto", "auto"), device="cuda", **limits)
    selection = select_engine(on_cuda, tiny_network, CROSS_ENCODER_INPUTS, tiny_probe)
    assert isinstance(selection.engine, BucketedTorchEngine)
    assert selection.upgrade is None  # compiled before serving, not in the background as on a CPU
    assert selection.parity.passed
    assert built == [ShapeBuckets(32, 2048, 512)]
    assert selection.engine.shape_buckets == built[0]
    assert selection.notes[0].startswith("tensorrt: unavailable")


@needs_openvino_int8  # four candidates, so that three held at once takes turns
def test_a_large_model_is_timed_in_turns_and_a_released_candidate_is_rebuilt_to_gate(
    tmp_path, tiny_network, tiny_probe, monkeypatch
):
    from sidecar.model.engines import selection as selection_module

    # Every network counts as large: three candidates at most are held at once.
    monkeypatch.setattr(selection_module, "_HELD_WEIGHT_BYTES", 1)
    assert selection_module.candidates_held_at_once(tiny_network) == 3

    def wrong(self, batch) -> np.ndarray:  # fast and failing the gate: they lead every turn, then fail
        return np.random.default_rng(0).normal(size=(batch.shape[0], 1)).astype(np.float32)

    monkeypatch.setattr(OnnxRuntimeEngine, "forward", wrong)
    monkeypatch.setattr(OpenVinoEngine, "forward", wrong)
    alive: set[int] = set()
    most_alive = [0]
    builds: dict[str, int] = {}
    build, close = selection_module._Builder.build, Engine.close

    def counting_build(self, candidate):
        engine = build(self, candidate)
        builds[str(candidate)] = builds.get(str(candidate), 0) + 1
        if engine is not self.reference:
            alive.add(id(engine))
            most_alive[0] = max(most_alive[0], len(alive))
        return engine

    def counting_close(self) -> None:
        alive.discard(id(self))
        close(self)

    monkeypatch.setattr(selection_module._Builder, "build", counting_build)
    monkeypatch.setattr(Engine, "close", counting_close)
    selection = select_engine(
        engine_request(tmp_path, precision="auto"), tiny_network, CROSS_ENCODER_INPUTS, tiny_probe
    )
    assert selection.engine.name == "torch"
    assert selection.parity.passed
    assert most_alive[0] <= 3
    assert set(selection.timings) == set(builds)  # every candidate that loaded was timed
    assert max(builds.values()) == 2, builds  # a released candidate was built again for its gate
    assert alive <= {id(selection.engine)}  # all but the serving engine were released
    failed = [note for note in selection.notes if "failed the parity gate" in note]
    assert {note.split(":")[0] for note in failed} >= {"onnxruntime/fp32", "openvino/fp32"}


class ScheduledEngine(Engine):
    """An engine whose forwards take the given seconds in turn, the last for every one after; its gate
    passes or fails as told."""

    name = "scheduled"

    def __init__(self, precision: str, seconds: list[float], passes: bool) -> None:
        super().__init__(precision=precision, device="cpu")
        self.seconds = seconds
        self.passes = passes
        self.calls = 0

    def forward(self, batch) -> np.ndarray:
        time.sleep(self.seconds[min(self.calls, len(self.seconds) - 1)])
        self.calls += 1
        return np.zeros((batch.shape[0], 1), dtype=np.float32)


def select_among(
    engines: dict[str, ScheduledEngine], tmp_path: Path, tiny_network, tiny_probe
) -> tuple[str, list[str]]:
    """Which of ``engines`` (by "name/precision") a selection under precision auto serves, and its notes."""
    from sidecar.model.cache import ArtifactCache
    from sidecar.model.engines import selection as selection_module
    from sidecar.model.engines.registry import EngineInputs
    from sidecar.model.phases import PhaseTimer

    reference = np.linspace(0.0, 1.0, len(tiny_probe.scores(TorchEngine(tiny_network, precision="fp32"))))

    class Builder(selection_module._Builder):
        def build(self, candidate: EngineCandidate) -> Engine:
            return engines[str(candidate)]

        def scores(self, engine: Engine) -> np.ndarray:
            return reference if engine.passes else reference[::-1]  # type: ignore[attr-defined]

    inputs = EngineInputs(tiny_network, "hash", CROSS_ENCODER_INPUTS, ArtifactCache(tmp_path))
    builder = Builder(engine_request(tmp_path, precision="auto"), inputs, None, tiny_probe)
    builder.reference_scores = reference
    candidates = [EngineCandidate(*label.split("/")) for label in engines]
    notes: list[str] = []
    selection = selection_module._select(candidates, notes, builder, PhaseTimer())
    served = next(label for label, engine in engines.items() if engine is selection.engine)
    return served, notes


def leader_and_disturbed_rivals(leader_passes: bool) -> dict[str, ScheduledEngine]:
    """a leads and passes the gate or not; b's first timed forward is disturbed, which puts it behind c
    after one round; d is the lossless leader, far behind."""
    return {
        "a/int8": ScheduledEngine("int8", [0.01], passes=leader_passes),
        "b/bf16": ScheduledEngine("bf16", [0.02, 0.045, 0.02], passes=True),
        "c/bf16": ScheduledEngine("bf16", [0.04], passes=True),
        "d/fp32": ScheduledEngine("fp32", [0.2], passes=True),
    }


def test_when_the_leader_fails_the_gate_the_close_candidates_behind_it_are_timed_again(
    tmp_path, tiny_network, tiny_probe
):
    # b and c stopped being timed after one round, behind a, which then failed the gate: one round would
    # have served c.
    engines = leader_and_disturbed_rivals(leader_passes=False)
    served, notes = select_among(engines, tmp_path, tiny_network, tiny_probe)
    assert served == "b/bf16"
    # Each had its warm-up and a round, then one more: with two, b is clearly ahead.
    assert (engines["b/bf16"].calls, engines["c/bf16"].calls) == (2 + 1, 2 + 1)
    assert engines["d/fp32"].calls == 4  # the lossless leader raced every round, and far behind b
    # c was gated when it looked fastest of those left.
    (note,) = [note for note in notes if note.startswith("c/bf16")]
    assert note.startswith("c/bf16: slower here")
    assert note.endswith("passed the parity gate")


def test_when_the_leader_passes_the_gate_nothing_is_timed_again(tmp_path, tiny_network, tiny_probe):
    engines = leader_and_disturbed_rivals(leader_passes=True)
    served, _ = select_among(engines, tmp_path, tiny_network, tiny_probe)
    assert served == "a/int8"
    assert engines["b/bf16"].calls == engines["c/bf16"].calls == 2  # the warm-up and the first round


def test_timing_again_rebuilds_released_candidates_only_within_the_held_limit(
    tmp_path, tiny_network, tiny_probe, monkeypatch
):
    from sidecar.model.engines import selection as selection_module

    monkeypatch.setattr(selection_module, "_HELD_WEIGHT_BYTES", 1)  # three held at most: timed in turns
    alive: set[int] = set()
    most_alive = [0]
    builds: list[str] = []

    class CountingBuilds(dict):
        def __getitem__(self, label: str) -> ScheduledEngine:
            engine = super().__getitem__(label)
            builds.append(label)
            alive.add(id(engine))
            most_alive[0] = max(most_alive[0], len(alive))
            return engine

    def counting_close(self) -> None:
        alive.discard(id(self))

    monkeypatch.setattr(ScheduledEngine, "close", counting_close)
    # a leads and fails the gate; the three bf16 candidates are close, each timed one round in its turn.
    engines = CountingBuilds(
        {
            "a/int8": ScheduledEngine("int8", [0.01], passes=False),
            "b/bf16": ScheduledEngine("bf16", [0.03], passes=True),
            "c/bf16": ScheduledEngine("bf16", [0.032], passes=True),
            "e/bf16": ScheduledEngine("bf16", [0.034], passes=True),
            "d/fp32": ScheduledEngine("fp32", [0.2], passes=True),
        }
    )
    served, _ = select_among(engines, tmp_path, tiny_network, tiny_probe)
    assert served in {"b/bf16", "c/bf16", "e/bf16"}
    assert len(builds) > len(engines)  # released candidates were built again
    assert most_alive[0] <= 3
