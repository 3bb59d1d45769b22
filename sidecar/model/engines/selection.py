"""The fallback chain and the parity gate: which engine and precision serve.

``--engine auto`` tries TensorRT, then ONNX Runtime, then torch; an explicit engine is the only one
tried. Every candidate that loads must pass the parity gate against torch fp32 before it may serve.
With a fixed precision the first candidate that passes serves. With ``--precision auto`` every
candidate the device offers is loaded and gated, and the fastest that passes, measured here on a
full batch, serves. When torch serves and ``--torch-compile`` asks, the winner is then compiled
and gated again. The reason each candidate was skipped is kept as a note for ``Info``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sidecar.errors import ModelLoadError
from sidecar.model.batch import TokenBatch
from sidecar.model.cache import ArtifactCache
from sidecar.model.engines import ENGINE_CHAIN, ENGINE_CHOICES, PRECISION_CHOICES
from sidecar.model.engines.base import Engine
from sidecar.model.engines.torch_engine import TorchEngine, compile_wanted
from sidecar.model.export import ExportedModel, export_onnx
from sidecar.model.network import Network, content_hash
from sidecar.model.parity import ParityReport, Probe, compare

logger = logging.getLogger(__name__)

_TIMED_RUNS = 5


@dataclass(frozen=True, slots=True)
class Candidate:
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


@dataclass
class Selection:
    engine: Engine
    parity: ParityReport
    notes: list[str] = field(default_factory=list)


def offered_precisions(engine: str, device: str) -> tuple[str, ...] | str:
    """The precisions ``engine`` runs on ``device``, fastest first, or why it cannot run there."""
    if engine == "tensorrt":
        from sidecar.model.engines.tensorrt_engine import tensorrt_precisions, unavailable_reason

        return unavailable_reason(device) or tensorrt_precisions(device)
    if engine == "onnxruntime":
        import importlib.util

        from sidecar.model.engines.onnxruntime_engine import onnxruntime_precisions

        if importlib.util.find_spec("onnxruntime") is None:
            return "the onnxruntime package is not installed"
        return onnxruntime_precisions(device)
    from sidecar.model.engines.torch_engine import torch_precisions

    return torch_precisions(device)


def plan_candidates(
    engine: str, precision: str, offers: Mapping[str, tuple[str, ...] | str]
) -> tuple[list[Candidate], list[str]]:
    """Candidates in the order to try them, and notes on engines ruled out before loading anything.

    ``offers`` maps each engine to its precisions on the device (fastest first) or to why it
    cannot run. An explicitly requested engine or precision that cannot run is a ModelLoadError.
    """
    if engine not in ENGINE_CHOICES:
        raise ModelLoadError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINE_CHOICES)}")
    if precision not in PRECISION_CHOICES:
        raise ModelLoadError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_CHOICES)}")
    engines = ENGINE_CHAIN if engine == "auto" else (engine,)
    candidates: list[Candidate] = []
    notes: list[str] = []
    for name in engines:
        offer = offers[name]
        if isinstance(offer, str):
            notes.append(f"{name}: unavailable: {offer}")
            continue
        if precision == "auto":
            candidates.extend(Candidate(name, offered) for offered in offer)
        elif precision in offer:
            candidates.append(Candidate(name, precision))
        else:
            notes.append(f"{name}: does not run {precision} here (it runs {', '.join(offer)})")
    if not candidates:
        wanted = "any engine" if engine == "auto" else f"the {engine} engine"
        raise ModelLoadError(f"{wanted} cannot run precision {precision} here: {'; '.join(notes)}")
    return candidates, notes


class _Builder:
    """Loads one candidate engine; the ONNX export is made once, when the first compiled engine needs it."""

    def __init__(
        self,
        request: EngineRequest,
        network: Network,
        input_names: tuple[str, ...],
        reference: Engine,
        probe: Probe,
    ) -> None:
        self.request = request
        self._network = network
        self._input_names = input_names
        self._reference = reference
        self._probe = probe
        self._cache = ArtifactCache(request.cache_dir)
        self._exported: ExportedModel | None = None

    def exported(self) -> ExportedModel:
        if self._exported is None:
            self._exported = export_onnx(
                self._network, content_hash(self._network), self._input_names, self._cache
            )
        return self._exported

    def build(self, candidate: Candidate) -> Engine:
        request = self.request
        if candidate.engine == "torch":
            return self._torch(candidate)
        if candidate.engine == "onnxruntime":
            from sidecar.model.engines.onnxruntime_engine import OnnxRuntimeEngine

            return OnnxRuntimeEngine(
                self.exported(),
                self._cache,
                precision=candidate.precision,
                device=request.device,
                threads=request.threads,
            )
        from sidecar.model.engines.tensorrt_engine import TensorRTEngine, shape_profiles

        return TensorRTEngine(
            self.exported(),
            self._cache,
            precision=candidate.precision,
            device=request.device,
            profiles=shape_profiles(request.max_batch_pairs, request.max_batch_tokens, request.max_length),
        )

    def _torch(self, candidate: Candidate) -> Engine:
        if candidate.precision == "fp32" and self.request.device == "cpu":
            return self._reference
        return TorchEngine(self._network, precision=candidate.precision, device=self.request.device)

    def compiled_torch(self, candidate: Candidate) -> Engine:
        """The torch engine at the candidate's precision, compiled by TorchInductor."""
        return TorchEngine(
            self._network,
            precision=candidate.precision,
            device=self.request.device,
            compile_sample=_full_batch(self.request, self._probe),
        )


def select_engine(
    request: EngineRequest,
    network: Network,
    input_names: tuple[str, ...],
    probe: Probe,
    offers: Callable[[str, str], tuple[str, ...] | str] = offered_precisions,
) -> Selection:
    """Load, gate and (for precision auto) time the candidates; returns the one that serves."""
    candidates, notes = plan_candidates(
        request.engine, request.precision, {name: offers(name, request.device) for name in ENGINE_CHAIN}
    )
    for note in notes:
        logger.warning("engine skipped: %s", note)
    reference = TorchEngine(network, precision="fp32", device="cpu")
    reference_scores = probe.scores(reference)
    builder = _Builder(request, network, input_names, reference, probe)
    explicit = request.engine != "auto" and request.precision != "auto"
    passed: list[tuple[Candidate, Engine, ParityReport]] = []
    for candidate in candidates:
        try:
            engine = builder.build(candidate)
        except Exception as exc:  # any failure to export, build or load moves down the chain
            if explicit:
                raise ModelLoadError(f"the requested engine {candidate} could not load: {exc}") from exc
            _skip(notes, f"{candidate}: failed to load: {type(exc).__name__}: {exc}", exc)
            continue
        report = compare(probe.scores(engine), reference_scores, candidate.precision)
        if not report.passed:
            if engine is not reference:
                engine.close()
            if explicit:
                raise ModelLoadError(
                    f"the requested engine {candidate} failed the parity gate against torch fp32: "
                    f"{report.describe()}; its scores would not match the model's"
                )
            _skip(notes, f"{candidate}: failed the parity gate: {report.describe()}")
            continue
        logger.info("%s passed the parity gate: %s", candidate, report.describe())
        passed.append((candidate, engine, report))
        if request.precision != "auto":
            break
    if not passed:
        raise ModelLoadError("no engine passed the parity gate: " + "; ".join(notes))
    chosen = passed[0]
    if len(passed) > 1:
        chosen = _fastest(passed, request, probe, notes)
    candidate, engine, report = chosen
    for _, other, _ in passed:
        if other is not engine and other is not reference:
            other.close()
    if candidate.engine == "torch" and compile_wanted(request.torch_compile, request.device):
        engine, report = _compiled(builder, candidate, engine, report, probe, reference_scores, notes)
    logger.info("serving with %s", candidate)
    return Selection(engine, report, notes)


def _compiled(
    builder: _Builder,
    candidate: Candidate,
    engine: Engine,
    report: ParityReport,
    probe: Probe,
    reference_scores: np.ndarray,
    notes: list[str],
) -> tuple[Engine, ParityReport]:
    """The chosen torch engine compiled, once it passes the parity gate itself; the candidates were
    timed uncompiled, since compiling each would multiply the start-up time.

    With ``--torch-compile on`` a failure is an error; under auto the uncompiled engine serves.
    """
    required = builder.request.torch_compile == "on"
    try:
        compiled = builder.compiled_torch(candidate)
    except Exception as exc:  # Inductor raises many kinds: C++ compiler, lowering, backend errors
        if required:
            raise ModelLoadError(f"--torch-compile on: compiling {candidate} failed: {exc}") from exc
        _skip(notes, f"{candidate} compiled: {type(exc).__name__}: {exc}; it runs uncompiled", exc)
        return engine, report
    compiled_report = compare(probe.scores(compiled), reference_scores, candidate.precision)
    if not compiled_report.passed:
        if required:
            raise ModelLoadError(
                f"--torch-compile on: {candidate} compiled failed the parity gate: "
                f"{compiled_report.describe()}"
            )
        failure = compiled_report.describe()
        _skip(notes, f"{candidate} compiled: failed the parity gate: {failure}; it runs uncompiled")
        return engine, report
    logger.info("%s compiled passed the parity gate: %s", candidate, compiled_report.describe())
    return compiled, compiled_report


def _skip(notes: list[str], note: str, exc: Exception | None = None) -> None:
    logger.warning("engine skipped: %s", note, exc_info=exc)
    notes.append(note)


def _fastest(
    passed: list[tuple[Candidate, Engine, ParityReport]],
    request: EngineRequest,
    probe: Probe,
    notes: list[str],
) -> tuple[Candidate, Engine, ParityReport]:
    """The candidate with the highest measured throughput on a full batch of the longest pairs."""
    batch = _full_batch(request, probe)
    speeds = throughputs([engine for _, engine, _ in passed], batch)
    best = int(np.argmax(speeds))
    for index, (candidate, _, _) in enumerate(passed):
        logger.info("%s: %.1f rows/s on a %dx%d batch", candidate, speeds[index], *batch.shape)
        if index != best:
            notes.append(
                f"{candidate}: passed the parity gate but is slower here "
                f"({speeds[index]:.1f} rows/s against {speeds[best]:.1f} for {passed[best][0]})"
            )
    return passed[best]


def _full_batch(request: EngineRequest, probe: Probe) -> TokenBatch:
    """The largest batch the batcher forms at the longest length, made of real probe tokens."""
    columns = min(request.max_length, request.max_batch_tokens)
    rows = max(1, min(request.max_batch_pairs, request.max_batch_tokens // columns))
    sample = probe.batches[0]
    tokens = sample.input_ids[0][sample.attention_mask[0] == 1]
    token_ids = np.tile(np.resize(tokens, columns), (rows, 1))
    token_types = None if sample.token_type_ids is None else np.zeros((rows, columns), dtype=np.int64)
    return TokenBatch(token_ids, np.ones((rows, columns), dtype=np.int64), token_types)


def throughputs(engines: list[Engine], batch: TokenBatch) -> list[float]:
    """Rows per second of each engine: the best of a few rounds after a warm-up.

    Every round times each engine once, so load from other processes falls on all of them alike
    instead of on whichever happened to be timed while the machine was busy.
    """
    for engine in engines:
        engine.forward(batch)
    best = [float("inf")] * len(engines)
    for _ in range(_TIMED_RUNS):
        for index, engine in enumerate(engines):
            started = time.perf_counter()
            engine.forward(batch)
            best[index] = min(best[index], time.perf_counter() - started)
    return [batch.shape[0] / seconds for seconds in best]
