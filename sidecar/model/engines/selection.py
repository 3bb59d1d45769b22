"""The fallback chain and the parity gate: which engine and precision serve.

``--engine auto`` tries TensorRT, then ONNX Runtime, then OpenVINO, then torch; an explicit engine is
the only one tried. Every candidate that loads must pass the parity gate against torch fp32 before it
may serve. With a fixed precision the first candidate that passes serves. With ``--precision auto`` every
candidate the device offers is loaded and timed on a batch shaped like the batcher's (a large model's in
turns, so its engines' weights are not all held at once); the fastest that passes serves, except that
a lossy precision must beat the fastest lossless one by ``--lossy-margin``.
Candidates are gated only as far as that choice needs (``choose``): usually just the one that serves.
The verdict is remembered in the cache (``verdict``): a restart on the same model, hardware, libraries
and settings loads and gates only the chosen engine. When torch serves and ``--torch-compile`` asks,
the winner is compiled and gated again: before serving with ``on`` and on CUDA, in the background
with ``auto`` on a CPU.
The reason each candidate was skipped is kept as a note for ``Info``.

A warm start (``select_remembered``) rebuilds a remembered engine other than torch from its cached
artifacts alone and gates it against the remembered reference scores: no network, no torch.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from sidecar.errors import ModelLoadError
from sidecar.model.batch import TokenBatch
from sidecar.model.cache import ArtifactCache
from sidecar.model.calibration import Calibration
from sidecar.model.engines import ENGINE_CHAIN, ENGINE_CHOICES, NETWORK_ENGINES, PRECISION_CHOICES
from sidecar.model.engines.base import Engine, forward_side_by_side
from sidecar.model.engines.registry import EngineInputs, EngineShape, Offer, Unavailable, engine_spec
from sidecar.model.engines.verdict import Verdict, VerdictStore
from sidecar.model.export import ExportedModel, library_versions
from sidecar.model.hardware import device_fingerprint
from sidecar.model.memory import release_unused_memory
from sidecar.model.parity import ParityReport, Probe, compare
from sidecar.model.phases import PhaseTimer

if TYPE_CHECKING:
    from sidecar.model.network import Network

logger = logging.getLogger(__name__)

# Timing rounds after a warm-up; a candidate clearly behind the leader stops being timed early.
_TIMED_ROUNDS = 3
_CLEARLY_BEHIND = 1.25
# The rounds that settle the order of candidates within _CLEARLY_BEHIND of each other: one disturbed
# forward can put a candidate that far behind.
_SETTLING_ROUNDS = 2
# Candidates held at once while selecting: as many as this much of the network's fp32 weights, and at
# least one more than the two that are kept (the fastest lossy and lossless). A base-sized model would
# otherwise hold every candidate's weights at once (benchmarks/RESULTS.md, "Start-up to SERVING and memory").
_HELD_WEIGHT_BYTES = 2 << 30
_HELD_AT_LEAST = 3
# The pair length candidates are timed at: a query and a passage, the batcher's common case.
_TYPICAL_PAIR_TOKENS = 256


@dataclass(frozen=True, slots=True)
class EngineCandidate:
    engine: str
    precision: str

    def __str__(self) -> str:
        return f"{self.engine}/{self.precision}"


@dataclass(frozen=True)
class EngineRequest:
    """What the settings ask for, with the device resolved and the batcher's shape limits."""

    engine: str
    precision: str
    device: str
    threads: int
    max_batch_pairs: int
    max_batch_tokens: int
    max_length: int
    cache_dir: Path
    torch_compile: str
    # Batch workers that will run the engine at once, each on ``threads`` threads.
    workers: int = 1
    lossy_margin: float = 0.15
    # Select afresh even when a verdict is remembered.
    reselect: bool = False


# What compiles the serving engine later and gates it: the compiled engine, or None when it did not
# pass (the reason is then in the selection's notes).
Upgrade = Callable[[], tuple[Engine, ParityReport] | None]


@dataclass
class Selection:
    engine: Engine
    parity: ParityReport
    notes: list[str] = field(default_factory=list)
    from_cache: bool = False
    # Rows per second of each candidate timed ("engine/precision"), when the choice was made.
    timings: dict[str, float] = field(default_factory=dict)
    speedup_over_lossless: float = 0.0
    # Set when --torch-compile auto leaves the compile for after the server is SERVING.
    upgrade: Upgrade | None = None
    # The content hash of the network, and its ONNX export when an engine was built from one: what a
    # later warm start finds the verdict and the artifacts by.
    model_hash: str = ""
    exported: ExportedModel | None = None


def is_lossy(precision: str, device: str) -> bool:
    """int8 anywhere, and half precision on a CPU, where it trades accuracy for speed; on a GPU fp16 is
    the native precision (TensorRT's, with its norms pinned to fp32)."""
    return precision == "int8" or (device == "cpu" and precision != "fp32")


def plan_candidates(
    engine: str,
    precision: str,
    offers: Mapping[str, Offer],
    withheld: Mapping[str, Mapping[str, str]] | None = None,
) -> tuple[list[EngineCandidate], list[str]]:
    """Candidates in the order to try them, and notes on engines ruled out before loading anything.

    ``offers`` maps each engine to its precisions on the device (fastest first) or to why it
    cannot run; ``withheld`` maps an engine to the precisions it leaves out on this device and why.
    An explicitly requested engine or precision that cannot run is a ModelLoadError.
    """
    withheld = withheld or {}
    if engine not in ENGINE_CHOICES:
        raise ModelLoadError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINE_CHOICES)}")
    if precision not in PRECISION_CHOICES:
        raise ModelLoadError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_CHOICES)}")
    engines = ENGINE_CHAIN if engine == "auto" else (engine,)
    candidates: list[EngineCandidate] = []
    notes: list[str] = []
    for name in engines:
        offer = offers[name]
        if isinstance(offer, Unavailable):
            notes.append(f"{name}: unavailable: {offer.reason}")
            continue
        left_out = withheld.get(name, {})
        if precision == "auto":
            candidates.extend(EngineCandidate(name, offered) for offered in offer)
            notes.extend(f"{name}/{held}: not offered here: {reason}" for held, reason in left_out.items())
        elif precision in offer:
            candidates.append(EngineCandidate(name, precision))
        elif precision in left_out:
            notes.append(f"{name}: does not run {precision} here: {left_out[precision]}")
        else:
            notes.append(f"{name}: does not run {precision} here (it runs {', '.join(offer)})")
    if not candidates:
        wanted = "any engine" if engine == "auto" else f"the {engine} engine"
        raise ModelLoadError(f"{wanted} cannot run precision {precision} here: {'; '.join(notes)}")
    return candidates, notes


class _Builder:
    """Builds candidate engines through the registry; the reference (torch fp32 on the CPU), when there
    is one, is reused."""

    def __init__(
        self,
        request: EngineRequest,
        inputs: EngineInputs,
        reference: Engine | None,
        probe: Probe,
    ) -> None:
        self.request = request
        self.inputs = inputs
        self.reference = reference
        self.probe = probe
        # The scores every candidate is gated against: the reference's, or those remembered with the
        # verdict; set before the first candidate is built.
        self.reference_scores: np.ndarray | None = None
        # Candidates that failed for this machine's state (a full disk), not for what they are: a
        # verdict without them is not remembered, so the next start tries them again.
        self.failed_for_the_machine: list[str] = []
        self._probe_scores: weakref.WeakKeyDictionary[Engine, np.ndarray] = weakref.WeakKeyDictionary()
        inputs.gate = self.gate
        self.shape = EngineShape(
            device=request.device,
            threads=request.threads,
            workers=request.workers,
            max_batch_pairs=request.max_batch_pairs,
            max_batch_tokens=request.max_batch_tokens,
            max_length=request.max_length,
        )

    def build(self, candidate: EngineCandidate) -> Engine:
        reference = self.reference
        if reference is not None and (candidate.engine, candidate.precision, self.request.device) == (
            reference.name,
            reference.precision,
            reference.device,
        ):
            return reference
        return engine_spec(candidate.engine).build(self.inputs, self.shape, candidate.precision)

    def scores(self, engine: Engine) -> np.ndarray:
        """The engine's normalized scores on the probe, its batches run as the batcher would run them:
        side by side on the workers where one forward uses only a worker's share of the threads. Kept
        while the engine lives: an engine gated while it was built is not run on the probe again."""
        if engine not in self._probe_scores:
            side_by_side = (
                self.request.workers if engine.forward_on_worker_share and engine.concurrent_forward else 1
            )
            self._probe_scores[engine] = self.probe.scores(engine, side_by_side)
        return self._probe_scores[engine]

    def gate(self, engine: Engine) -> ParityReport:
        """The parity gate's report on the engine's scores against the reference scores."""
        assert self.reference_scores is not None, "the reference scores come before any candidate"
        return compare(self.scores(engine), self.reference_scores, engine.precision)

    def compiled_torch(self, candidate: EngineCandidate) -> Engine:
        """The torch engine at the candidate's precision, compiled by TorchInductor."""
        from sidecar.model.engines.torch_compiled import compiled_torch_engine

        return compiled_torch_engine(
            self.inputs.network,
            precision=candidate.precision,
            shape=self.shape,
            sample=typical_batch(self.request, self.probe),
            input_names=self.inputs.input_names,
        )


def select_engine(
    request: EngineRequest,
    network: Network,
    input_names: tuple[str, ...],
    probe: Probe,
    phases: PhaseTimer | None = None,
    calibration: Calibration | None = None,
) -> Selection:
    """The engine that serves: the remembered choice when it still holds, else a fresh selection.
    ``calibration`` is what static int8 calibrates on."""
    from sidecar.model.engines.torch_engine import TorchEngine, compile_wanted
    from sidecar.model.network import content_hash

    phases = phases or PhaseTimer()
    specs = {name: engine_spec(name) for name in ENGINE_CHAIN}
    candidates, notes = plan_candidates(
        request.engine,
        request.precision,
        {name: spec.precisions(request.device) for name, spec in specs.items()},
        {name: spec.withheld(request.device) for name, spec in specs.items()},
    )
    for note in notes:
        logger.warning("engine skipped: %s", note)
    model_hash = content_hash(network)
    key = verdict_key(request, model_hash, probe, calibration)
    store = VerdictStore(request.cache_dir)
    reference = TorchEngine(network, precision="fp32", device="cpu")

    def timed_export(export: Callable[[], ExportedModel]) -> ExportedModel:
        with phases.timed("export"):
            return export()

    inputs = EngineInputs(
        network,
        model_hash,
        input_names,
        ArtifactCache(request.cache_dir),
        on_export=timed_export,
        calibration=calibration,
    )
    builder = _Builder(request, inputs, reference, probe)
    selection: Selection | None = None
    if request.reselect:
        logger.info("selecting an engine afresh: --reselect")
    else:
        remembered, why_not = store.recall(model_hash, request.device, key)
        if remembered is not None:
            reference_scores = np.asarray(remembered.reference_scores)
            selection, why_not = _remembered(remembered, builder, reference_scores, phases)
        if selection is None:
            logger.info("selecting an engine afresh: %s", why_not)
    if selection is None:
        with phases.timed("gate"):
            reference_scores = builder.reference_scores = builder.scores(reference)
        selection = _select(candidates, notes, builder, phases)
        if builder.failed_for_the_machine:
            logger.warning(
                "not remembering %s/%s, so the next start selects again: %s failed to load",
                selection.engine.name,
                selection.engine.precision,
                ", ".join(builder.failed_for_the_machine),
            )
        else:
            store.remember(
                model_hash,
                request.device,
                key,
                Verdict(
                    engine=selection.engine.name,
                    precision=selection.engine.precision,
                    timings=selection.timings,
                    speedup_over_lossless=selection.speedup_over_lossless,
                    notes=tuple(selection.notes),
                    reference_scores=tuple(float(score) for score in reference_scores),
                ),
            )
    candidate = EngineCandidate(selection.engine.name, selection.engine.precision)
    if candidate.engine in NETWORK_ENGINES and compile_wanted(request.torch_compile, request.device):
        compile_step = _compile_step(builder, candidate, selection)
        # On CUDA the compile comes before serving, so the graphs are captured with the GPU to themselves.
        if request.torch_compile == "on" or request.device != "cpu":
            with phases.timed("compile"), worker_threads(request.threads):
                upgraded = compile_step()
            if upgraded is not None:  # None under auto: the note says why, and the eager engine serves
                selection.engine, selection.parity = upgraded
        else:
            selection.upgrade = compile_step
    logger.info("serving with %s%s", candidate, " (remembered)" if selection.from_cache else "")
    selection.model_hash = model_hash
    selection.exported = inputs.made_export
    return selection


def select_remembered(
    request: EngineRequest, inputs: EngineInputs, probe: Probe, phases: PhaseTimer
) -> tuple[Selection | None, str]:
    """A warm start: the remembered engine, when it is not torch, rebuilt from what ``inputs`` hold (an
    earlier start's export and a reuse-only cache) and gated against the remembered reference scores;
    or None and why not, for the start to go through ``select_engine`` instead."""
    if request.reselect:
        return None, "--reselect"
    model_hash = inputs.model_hash
    key = verdict_key(request, model_hash, probe, inputs.calibration)
    remembered, why_not = VerdictStore(request.cache_dir).recall(model_hash, request.device, key)
    if remembered is None:
        return None, why_not
    if remembered.engine in NETWORK_ENGINES:
        return None, f"the remembered engine is {remembered.candidate}, which needs the PyTorch network"
    builder = _Builder(request, inputs, None, probe)
    selection, why_not = _remembered(remembered, builder, np.asarray(remembered.reference_scores), phases)
    if selection is not None:
        logger.info("serving with %s (its cached verdict and artifacts)", remembered.candidate)
        selection.model_hash = model_hash
        selection.exported = inputs.made_export
    return selection, why_not


@contextmanager
def worker_threads(threads: int) -> Iterator[None]:
    """Torch's threads set to one batch worker's share: what candidates are timed and kernels generated
    with, while loading and gating use every thread. Process-wide, so only for use while loading."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def engine_library_versions() -> dict[str, str]:
    """The versions of every library whose kernels an engine runs, installed or not."""
    versions = library_versions()
    for package in ("onnxruntime", "onnxruntime-gpu", "openvino", "nncf", "tensorrt"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


def verdict_key(
    request: EngineRequest, model_hash: str, probe: Probe, calibration: Calibration | None = None
) -> dict[str, str]:
    """Everything a selection's outcome depends on: static int8's scores depend on its calibration."""
    settings = {
        "engine": request.engine,
        "precision": request.precision,
        "device": request.device,
        "threads": request.threads,
        "workers": request.workers,
        "max_batch_pairs": request.max_batch_pairs,
        "max_batch_tokens": request.max_batch_tokens,
        "max_length": request.max_length,
        "lossy_margin": request.lossy_margin,
    }
    return {
        "model": model_hash,
        "probe": probe.digest(),
        "calibration": calibration.digest() if calibration is not None else "none",
        **device_fingerprint(request.device),
        **engine_library_versions(),
        **{name: str(value) for name, value in settings.items()},
    }


def _remembered(
    verdict: Verdict, builder: _Builder, reference_scores: np.ndarray, phases: PhaseTimer
) -> tuple[Selection | None, str]:
    """The remembered candidate, loaded and gated once against the remembered reference scores; or None
    and why it no longer serves."""
    candidate = EngineCandidate(verdict.engine, verdict.precision)
    builder.reference_scores = reference_scores
    try:
        with phases.timed("build"):
            engine = builder.build(candidate)
    except Exception as exc:  # any failure to load sends the start through the full selection
        return None, f"the remembered {candidate} could not load: {type(exc).__name__}: {exc}"
    with phases.timed("gate"):
        report = builder.gate(engine)
    if not report.passed:
        engine.close()
        return None, f"the remembered {candidate} failed the parity gate: {report.describe()}"
    logger.info("%s (the cached verdict's) passed the parity gate: %s", candidate, report.describe())
    selection = Selection(
        engine,
        report,
        notes=list(verdict.notes),
        from_cache=True,
        timings=dict(verdict.timings),
        speedup_over_lossless=verdict.speedup_over_lossless,
    )
    return selection, ""


def _select(
    candidates: list[EngineCandidate],
    notes: list[str],
    builder: _Builder,
    phases: PhaseTimer,
) -> Selection:
    """With a fixed precision, the first candidate in chain order that loads and passes the parity gate.
    Under precision auto, every candidate that loads is timed first, then gated in order of speed only as
    far as ``choose`` needs: a candidate that could not serve however it scored is never gated.

    Candidates are timed side by side, all together while ``candidates_held_at_once`` allows. A larger
    model's are timed in turns as they load, each turn keeping only the fastest lossy and the fastest
    lossless engine; one released that the choice then gates is rebuilt from the artifacts its first
    build cached. A candidate that fails the gate is released at once.

    Where the choice falls to a candidate whose order against those close to it rests on one round (it
    stopped being timed behind a leader that then failed the gate), they are timed again and the choice
    made again; gates already run are not repeated."""
    request = builder.request
    explicit = request.engine != "auto" and request.precision != "auto"
    gate = _Gate(builder, notes, phases, explicit)
    if request.precision != "auto":
        for candidate in candidates:
            engine = _built(candidate, builder, notes, phases, explicit)
            if engine is None:
                continue
            report = gate.passes(candidate, engine)
            if report is not None:
                return Selection(engine, report, notes)
            if engine is not builder.reference:
                engine.close()
        raise ModelLoadError("no engine passed the parity gate: " + "; ".join(notes))
    loaded: list[EngineCandidate] = []  # the candidates that loaded, in chain order
    held: dict[int, Engine] = {}  # their engines not yet released, by index into ``loaded``
    timed = _Timed()
    speeds = timed.speeds
    lossy: list[bool] = []  # whether each loaded candidate is lossy
    held_at_once = candidates_held_at_once(builder.inputs.network)
    in_turns = held_at_once < len(candidates)  # too large a model to hold every candidate at once

    def release(index: int) -> None:
        timed.warm.discard(index)
        engine = held.pop(index)
        if engine is not builder.reference:
            engine.close()

    def costly_held() -> int:  # the engines held that are not the reference
        return sum(held_engine is not builder.reference for held_engine in held.values())

    for position, candidate in enumerate(candidates):
        engine = _built(candidate, builder, notes, phases, explicit)
        if engine is not None:
            held[len(loaded)] = engine
            loaded.append(candidate)
            lossy.append(is_lossy(candidate.precision, request.device))
        if engine is not None and costly_held() >= held_at_once and position < len(candidates) - 1:
            # Past what may be held at once: time the new candidates against the fastest held of their
            # group (lossy or not), and keep only each group's fastest, which the choice compares; the
            # others are rebuilt if it needs them.
            untimed = [index for index in held if index not in speeds]
            groups = {lossy[index] for index in untimed}
            leaders = [index for index in _group_leaders(held, lossy, speeds) if lossy[index] in groups]
            _time(held, untimed + leaders, lossy, timed, builder, phases, group_leaders_only=True)
            kept = _group_leaders(held, lossy, speeds)
            for index in [index for index in held if index not in kept]:
                release(index)
        if in_turns:
            # What a build left behind (a calibration's model copies, a compile's buffers, a failed
            # build's remains) goes back to the system before the next one. A small model's is little,
            # and each collection would cost its cold start time.
            release_unused_memory()
    if not loaded:
        raise ModelLoadError("no engine could load: " + "; ".join(notes))
    if len(loaded) == 1:
        (candidate, engine), timings, speedup = (loaded[0], held[0]), {}, 0.0
        report = gate.passes(candidate, engine)
        if report is None:
            raise ModelLoadError("no engine passed the parity gate: " + "; ".join(notes))
    else:
        if len(held) > 1 or any(index not in speeds for index in held):  # the groups' leaders side by side
            _time(held, list(held), lossy, timed, builder, phases)
        reports: dict[int, ParityReport | None] = {}

        def is_held(index: int) -> bool:
            """Whether the candidate's engine is held, one released while timing rebuilt from the artifacts
            cached then; one that no longer loads counts as failed."""
            if index not in held:
                rebuilt = _built(loaded[index], builder, notes, phases, explicit)
                if rebuilt is None:
                    reports[index] = None
                    return False
                held[index] = rebuilt
            return True

        def failed() -> set[int]:
            return {index for index, report in reports.items() if report is None}

        def passes(index: int) -> bool:
            if index in reports:  # gated before this decision
                return reports[index] is not None
            if not is_held(index):
                return False
            reports[index] = gate.passes(loaded[index], held[index])
            if reports[index] is None:
                release(index)
            return reports[index] is not None

        def speed_list() -> list[float]:
            return [speeds[index] for index in range(len(loaded))]

        gated: set[int] = set()
        timed_again: set[int] = set()
        while True:
            best, speedup, newly_gated = decide(loaded, speed_list(), request, passes, notes)
            gated |= newly_gated
            rivals = _rivals_to_time_again(best, timed, failed(), timed_again)
            if not rivals:
                break
            # Which of them serves, or sets the lossy margin, rests on a round or two: a candidate clearly
            # behind the leader stopped being timed early, and the leader then failed the gate. One
            # released in turns is rebuilt only while fewer than ``held_at_once`` are held; else its round
            # stands.
            timed_again.update(rivals)
            rivals = [i for i in rivals if i in held or (costly_held() < held_at_once and is_held(i))]
            more = _SETTLING_ROUNDS - min(timed.rounds[index] for index in rivals)
            if len(rivals) > 1 and more > 0:
                _time(held, rivals, lossy, timed, builder, phases, rounds=more)
        timings = {str(candidate): speeds[index] for index, candidate in enumerate(loaded)}
        note_the_others(loaded, speed_list(), request, best, gated, failed(), notes)
        candidate, engine = loaded[best], held[best]
        report = reports[best]
        assert report is not None  # choose serves only a candidate that passed
    for index in list(held):
        if held[index] is not engine:
            release(index)
    return Selection(engine, report, notes, timings=timings, speedup_over_lossless=speedup)


def _built(
    candidate: EngineCandidate, builder: _Builder, notes: list[str], phases: PhaseTimer, explicit: bool
) -> Engine | None:
    """The candidate's engine, or None when it fails to load (an error when it was asked for)."""
    try:
        with phases.timed("build"):
            engine = builder.build(candidate)
    except Exception as exc:  # any failure to export, build or load moves down the chain
        if explicit:
            raise ModelLoadError(f"the requested engine {candidate} could not load: {exc}") from exc
        _skip(notes, f"{candidate}: failed to load: {type(exc).__name__}: {exc}", exc)
        if isinstance(exc, OSError):
            builder.failed_for_the_machine.append(f"{candidate} ({type(exc).__name__}: {exc})")
        return None
    note = f"{candidate}: {engine.note}"
    if engine.note and note not in notes:  # a candidate rebuilt after release is noted once
        notes.append(note)
    return engine


def candidates_held_at_once(network: Network) -> int:
    """How many candidate engines selection holds at once: as many as ``_HELD_WEIGHT_BYTES`` of the
    network's fp32 weights, and at least ``_HELD_AT_LEAST``."""
    weight_bytes = 4 * sum(weight.numel() for weight in network.parameters())
    return max(_HELD_AT_LEAST, _HELD_WEIGHT_BYTES // max(weight_bytes, 1))


def _group_leaders(held: Mapping[int, Engine], lossy: list[bool], speeds: Mapping[int, float]) -> list[int]:
    """The fastest timed engine held of each group, lossy and lossless."""
    leaders = []
    for group in (True, False):
        timed = [index for index in held if lossy[index] == group and index in speeds]
        if timed:
            leaders.append(max(timed, key=speeds.__getitem__))
    return leaders


@dataclass
class _Timed:
    """What timing the candidates found, by their index among those loaded."""

    speeds: dict[int, float] = field(default_factory=dict)  # rows per second, each one's best
    rounds: dict[int, int] = field(default_factory=dict)  # the rounds timed, after the warm-up
    warm: set[int] = field(default_factory=set)  # the engines held that ran the timing batch


def _rivals_to_time_again(best: int, timed: _Timed, failed: set[int], timed_again: set[int]) -> list[int]:
    """``best`` and the candidates close enough to it to serve instead or set its lossy margin (each not
    failed within ``_CLEARLY_BEHIND`` of its speed), when their order rests on fewer than
    ``_SETTLING_ROUNDS`` for one of them that was not timed again already; else none."""
    speeds, rounds = timed.speeds, timed.rounds
    near = [
        index
        for index in speeds
        if index not in failed
        and max(speeds[index], speeds[best]) <= _CLEARLY_BEHIND * min(speeds[index], speeds[best])
    ]
    if len(near) > 1 and any(rounds[index] < _SETTLING_ROUNDS and index not in timed_again for index in near):
        return near
    return []


def _time(
    held: Mapping[int, Engine],
    indices: list[int],
    lossy: list[bool],
    timed: _Timed,
    builder: _Builder,
    phases: PhaseTimer,
    *,
    group_leaders_only: bool = False,
    rounds: int = _TIMED_ROUNDS,
) -> None:
    """Times the held engines ``indices`` side by side into ``timed``, keeping each one's best speed and
    counting its rounds; one warm already is not warmed up again. ``group_leaders_only`` and ``rounds``
    as for ``throughputs``."""
    request = builder.request
    with phases.timed("timing"), worker_threads(request.threads):
        measured = throughputs(
            [held[index] for index in indices],
            typical_batch(request, builder.probe, worker_share=True),
            groups=[lossy[index] for index in indices],
            warm=[index in timed.warm for index in indices],
            group_leaders_only=group_leaders_only,
            rounds=rounds,
            side_by_side=request.workers,
        )
    for index, throughput in zip(indices, measured, strict=True):
        timed.speeds[index] = max(timed.speeds.get(index, 0.0), throughput.rows_per_s)
        timed.rounds[index] = timed.rounds.get(index, 0) + throughput.rounds
    timed.warm.update(indices)


@dataclass
class _Gate:
    """Gates candidates against the reference scores; a candidate that fails is noted (an error when it
    was asked for)."""

    builder: _Builder
    notes: list[str]
    phases: PhaseTimer
    explicit: bool

    def passes(self, candidate: EngineCandidate, engine: Engine) -> ParityReport | None:
        """The candidate's passing report, or None when it failed the gate."""
        with self.phases.timed("gate"):
            report = self.builder.gate(engine)
        if report.passed:
            logger.info("%s passed the parity gate: %s", candidate, report.describe())
            return report
        if self.explicit:
            raise ModelLoadError(
                f"the requested engine {candidate} failed the parity gate against torch fp32: "
                f"{report.describe()}; its scores would not match the model's"
            )
        _skip(self.notes, f"{candidate}: failed the parity gate: {report.describe()}")
        return None


def choose(
    candidates: list[EngineCandidate],
    speeds: list[float],
    request: EngineRequest,
    passes: Callable[[int], bool],
    notes: list[str],
) -> tuple[int, float]:
    """The index of the candidate that serves, and its speed over the fastest lossless candidate.

    The fastest candidate that passes serves, unless it is lossy and not ``lossy_margin`` faster than the
    fastest lossless one that passes: a lossy precision costs fidelity, and a score that shifts with its
    batch companions, so it must buy a clear speed-up. ``passes`` gates a candidate by its index, and is
    called only while the outcome is open: first for the lossy candidates past the margin over the
    fastest lossless one, fastest first; a lossless candidate only when no lossy one beats it, and it
    would serve. If it fails, the next lossless one sets the margin and the lossy ones past that are
    tried, and so on. So usually one candidate is gated, the one that serves. Each other candidate gets
    a note saying why it does not serve.
    """
    best, speedup, gated = decide(candidates, speeds, request, passes, notes)
    note_the_others(candidates, speeds, request, best, gated, gated - {best}, notes)
    return best, speedup


def decide(
    candidates: list[EngineCandidate],
    speeds: list[float],
    request: EngineRequest,
    passes: Callable[[int], bool],
    notes: list[str],
) -> tuple[int, float, set[int]]:
    """``choose``'s choice, and the candidates it gated, without the notes on the others; ``notes`` only
    explain an error when none passes."""
    lossy = [is_lossy(candidate.precision, request.device) for candidate in candidates]
    by_speed = sorted(range(len(candidates)), key=speeds.__getitem__, reverse=True)
    lossless = [index for index in by_speed if not lossy[index]]
    gated: set[int] = set()

    def gate(index: int) -> bool:
        gated.add(index)
        return passes(index)

    best: int | None = None
    bar_setter: int | None = None
    while best is None:
        bar_setter = next((index for index in lossless if index not in gated), None)
        bar = 0.0 if bar_setter is None else speeds[bar_setter] * (1.0 + request.lossy_margin)
        best = next(
            (
                index
                for index in by_speed
                if lossy[index] and speeds[index] >= bar and index not in gated and gate(index)
            ),
            None,
        )
        if best is None:
            if bar_setter is None:
                raise ModelLoadError("no engine passed the parity gate: " + "; ".join(notes))
            if gate(bar_setter):
                best = bar_setter
    speedup = 0.0 if bar_setter is None else speeds[best] / speeds[bar_setter]
    return best, speedup, gated


def note_the_others(
    candidates: list[EngineCandidate],
    speeds: list[float],
    request: EngineRequest,
    best: int,
    gated: set[int],
    failed: set[int],
    notes: list[str],
) -> None:
    """Logs every candidate's speed, and notes why each that neither serves nor failed the gate (noted
    there) does not serve."""
    for index in sorted(range(len(candidates)), key=speeds.__getitem__, reverse=True):
        candidate = candidates[index]
        logger.info("%s: %.1f rows/s", candidate, speeds[index])
        if index == best or index in failed:
            continue
        against = f"({speeds[index]:.1f} rows/s against {speeds[best]:.1f} for {candidates[best]})"
        gating = "passed the parity gate" if index in gated else "not gated"
        if speeds[index] > speeds[best]:
            notes.append(
                f"{candidate}: faster {against}, but a lossy precision serves only when "
                f"{request.lossy_margin:.0%} faster than lossless (--lossy-margin); {gating}"
            )
        else:
            notes.append(f"{candidate}: slower here {against}; {gating}")


def _compile_step(
    builder: _Builder,
    candidate: EngineCandidate,
    selection: Selection,
) -> Upgrade:
    """Compiles the serving torch engine and gates it; the candidates were timed uncompiled, since
    compiling each would multiply the start-up time.

    With ``--torch-compile on`` a failure is an error; under auto it leaves a note and the uncompiled
    engine serves on.
    """
    required = builder.request.torch_compile == "on"
    notes = selection.notes

    def compile_and_gate() -> tuple[Engine, ParityReport] | None:
        try:
            compiled = builder.compiled_torch(candidate)
        except Exception as exc:  # Inductor raises many kinds: C++ compiler, lowering, backend errors
            if required:
                raise ModelLoadError(f"--torch-compile on: compiling {candidate} failed: {exc}") from exc
            _skip(notes, f"{candidate} compiled: {type(exc).__name__}: {exc}; it runs uncompiled", exc)
            return None
        report = builder.gate(compiled)
        if not report.passed:
            if required:
                raise ModelLoadError(
                    f"--torch-compile on: {candidate} compiled failed the parity gate: {report.describe()}"
                )
            failure = report.describe()
            _skip(notes, f"{candidate} compiled: failed the parity gate: {failure}; it runs uncompiled")
            return None
        logger.info("%s compiled passed the parity gate: %s", candidate, report.describe())
        return compiled, report

    return compile_and_gate


def _skip(notes: list[str], note: str, exc: Exception | None = None) -> None:
    logger.warning("engine skipped: %s", note, exc_info=exc)
    notes.append(note)


def typical_batch(request: EngineRequest, probe: Probe, *, worker_share: bool = False) -> TokenBatch:
    """A full batch of the batcher's common case, pairs of a query and a passage, of real probe tokens:
    what the compiler tunes its kernels for. With ``worker_share``, one batch worker's share of it, as
    the batcher splits a short queue among idle workers: what candidates are timed on, which costs a
    cold start half the timing on two workers."""
    columns = min(request.max_length, _TYPICAL_PAIR_TOKENS, request.max_batch_tokens)
    rows = max(1, min(request.max_batch_pairs, request.max_batch_tokens // columns))
    if worker_share:
        rows = max(1, rows // request.workers)
    tokens = probe.longest_row()
    token_ids = np.tile(np.resize(tokens, columns), (rows, 1))
    with_token_types = probe.batches[0].token_type_ids is not None
    token_types = np.zeros((rows, columns), dtype=np.int64) if with_token_types else None
    return TokenBatch(token_ids, np.ones((rows, columns), dtype=np.int64), token_types)


class Throughput(NamedTuple):
    rows_per_s: float
    # The rounds it was timed, after its warm-up.
    rounds: int


def throughputs(
    engines: list[Engine],
    batch: TokenBatch,
    groups: list[bool] | None = None,
    warm: list[bool] | None = None,
    *,
    group_leaders_only: bool = False,
    rounds: int = _TIMED_ROUNDS,
    side_by_side: int = 1,
) -> list[Throughput]:
    """Rows per second of each engine: the best of ``rounds`` rounds after a warm-up (none for an engine
    ``warm`` says has run this batch before). The warm-ups run ``side_by_side`` at once: they are not
    timed, and each forward runs on one batch worker's share of the threads.

    Every round times each engine still in the race once, so load from other processes falls on all of
    them alike. After the first round an engine more than ``_CLEARLY_BEHIND`` slower than the leader
    stops being timed, unless it leads its group (``groups``: lossy or not), whose best the choice
    compares. With ``group_leaders_only`` the timing ends once each group has one engine left racing:
    it was to find each group's fastest, not to measure the groups against each other.
    """
    groups = groups or [False] * len(engines)
    warm = warm or [False] * len(engines)
    cold = [engine for engine, warmed_up in zip(engines, warm, strict=True) if not warmed_up]
    forward_side_by_side([(engine, batch) for engine in cold], side_by_side)
    best = [float("inf")] * len(engines)
    timed_rounds = [0] * len(engines)
    racing = list(range(len(engines)))
    for _ in range(rounds):
        for index in racing:
            started = time.perf_counter()
            engines[index].forward(batch)
            best[index] = min(best[index], time.perf_counter() - started)
            timed_rounds[index] += 1
        leaders = {
            min((i for i in racing if groups[i] == group), key=best.__getitem__) for group in set(groups)
        }
        leader = min(best)
        racing = [i for i in racing if i in leaders or best[i] <= _CLEARLY_BEHIND * leader]
        if group_leaders_only and len(racing) == len({groups[i] for i in racing}):
            break
    rows = batch.shape[0]
    return [Throughput(rows / seconds, count) for seconds, count in zip(best, timed_rounds, strict=True)]
