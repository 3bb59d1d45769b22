"""Loading what serves requests: the model's metadata and tokenizer, and an engine with its weights."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import logging
import multiprocessing
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from sidecar.errors import ModelLoadError
from sidecar.logs import configure_logging
from sidecar.model.cache import (
    ArtifactCache,
    recording_cache_use,
    remove_entries,
    remove_unused_entries,
    usable_cache_dir,
)
from sidecar.model.calibration import CalibrationSet, model_calibration, read_calibration
from sidecar.model.engines import NETWORK_ENGINES, Engine
from sidecar.model.engines.openvino_int8 import int8_withheld_reason
from sidecar.model.engines.registry import EngineInputs
from sidecar.model.engines.selection import EngineRequest, Selection, select_engine, select_remembered
from sidecar.model.export import cached_export
from sidecar.model.hardware import describe_device, usable_cpus
from sidecar.model.kinds import kind_of, load_model, load_model_network
from sidecar.model.loading import BiEncoderModel, CrossEncoderModel, ModelSource
from sidecar.model.memory import release_unused_memory
from sidecar.model.parity import Probe
from sidecar.model.phases import PhaseTimer
from sidecar.model.warm import (
    NEEDS_NETWORK,
    WarmStore,
    differing_files,
    model_files,
    rebuild_model,
    record_of,
    warm_key,
)
from sidecar.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    model: CrossEncoderModel | BiEncoderModel
    # The engine chosen at start; with --torch-compile auto a compiled one may take over later
    # (``selection.upgrade``), so the batcher holds the one serving now.
    engine: Engine
    # The batcher's token budget: the configured one, or the device's default (see batch_token_budget).
    max_batch_tokens: int
    # The most pairs in a batch: the configured number, or the device's default (see batch_pair_limit).
    max_batch_pairs: int
    # Batches the engine runs at once (see batch_workers), each with its share of the threads.
    batch_workers: int
    # How the engine was chosen; its notes say why engines ahead of the serving one were skipped.
    selection: Selection
    # Seconds of each loading phase so far; the server adds the warm-up.
    phases: PhaseTimer
    # The hardware the engine runs on, as Info and the logs name it.
    hardware: str
    lossy_margin: float


# On a CPU, batches of about 4096 tokens ran faster per pair than batches of 8192, which spill out of
# cache (benchmarks/RESULTS.md, "Engines and precisions", AMX runs 8-9). A GPU needs larger batches to
# keep its multiprocessors busy: a 100-candidate request of passages fits one batch ("NVIDIA H200").
_CPU_BATCH_TOKENS = 4096
_CUDA_BATCH_TOKENS = 32768
_CPU_BATCH_PAIRS = 32
_CUDA_BATCH_PAIRS = 256
# Loaded by the NVIDIA driver: where it is absent, --device auto means the CPU without asking torch.
_NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")


@functools.cache
def _default_threads() -> int:
    """Torch's own default (one per core, or OMP_NUM_THREADS), read before the server changes it, and
    never past the cores the container's CPU quota allows (``usable_cpus``)."""
    import torch

    return min(torch.get_num_threads(), usable_cpus())


def batch_token_budget(configured: int, device: str, max_length: int) -> int:
    """``--max-batch-tokens``, or when it is 0 the device's default, raised to fit one full-length input."""
    if configured:
        return configured
    default = _CPU_BATCH_TOKENS if device == "cpu" else _CUDA_BATCH_TOKENS
    return max(default, max_length)


def served_batch_tokens(configured: int, budget: int, engine: Engine, max_length: int) -> int:
    """The batcher's token budget: ``budget`` (see batch_token_budget), or when ``--max-batch-tokens``
    is 0 and the engine serves as fast with smaller batches, its own, raised to fit one full-length
    input."""
    if configured or engine.preferred_batch_tokens is None:
        return budget
    return min(budget, max(engine.preferred_batch_tokens, max_length))


def batch_pair_limit(configured: int, device: str) -> int:
    """``--max-batch-pairs``, or when it is 0 the device's default."""
    if configured:
        return configured
    return _CPU_BATCH_PAIRS if device == "cpu" else _CUDA_BATCH_PAIRS


def batch_workers(configured: int, device: str, threads: int) -> int:
    """``--batch-workers``, or when it is 0 the device's default: 2 on a CPU with 2 threads or more,
    where single-threaded batches never wait at each other's thread barriers (benchmarks/RESULTS.md,
    "Engines and precisions", AMX runs 8-9), and 1 on CUDA: the GPU runs one batch at a time, and a
    request shared out among idle workers would run as several smaller batches one after the other
    (benchmarks/RESULTS.md, "NVIDIA H200").
    """
    if configured:
        return configured
    return 2 if device == "cpu" and threads >= 2 else 1


def serving_workers(configured: int, wanted: int, engine: Engine) -> int:
    """The workers the batcher runs for ``engine``: one for an engine that cannot run batches side by
    side, which is an error when the operator asked for more."""
    if wanted > 1 and not engine.concurrent_forward:
        if configured:
            raise ModelLoadError(
                f"--batch-workers {configured}: the {engine.name} engine runs one batch at a time; use 1"
            )
        return 1
    return wanted


def engine_request(
    settings: Settings, device: str, max_length: int, threads: int, workers: int, cache_dir: Path
) -> EngineRequest:
    """What the settings ask of the engine chain; ``threads`` is each of the ``workers``' share."""
    return EngineRequest(
        engine=settings.engine,
        precision=settings.precision,
        device=device,
        threads=threads,
        max_batch_pairs=batch_pair_limit(settings.max_batch_pairs, device),
        max_batch_tokens=batch_token_budget(settings.max_batch_tokens, device, max_length),
        max_length=max_length,
        cache_dir=cache_dir,
        torch_compile=settings.torch_compile,
        workers=workers,
        lossy_margin=settings.lossy_margin,
        reselect=settings.reselect,
    )


def load_runtime(
    settings: Settings, source: ModelSource, selection_process: SelectionProcess | None = None
) -> Runtime:
    """Blocking: reads files and weights, exports and compiles. The server calls it on a worker thread.

    A warm start (see ``_warm_runtime``) reads the model's tokenizer and a compiled engine from the
    cache without importing torch or transformers; when it cannot, the start loads the model in full.
    A first start selects in ``selection_process``, which the models of one start share, or else in a
    child process of its own.
    """
    # Checked before any library makes its own cache directory in it: one that cannot be written is a
    # warning, and a temporary directory stands in (torch._dynamo creates Inductor's on import).
    cache_dir = usable_cache_dir(Path(settings.cache_dir).expanduser())
    source = dataclasses.replace(source, trust_remote_code=settings.trust_remote_code)
    calibration_set = read_calibration(settings.calibration_file)  # a bad file stops the start first
    phases = PhaseTimer()
    warm = _warm_runtime(settings, source, cache_dir, calibration_set, phases)
    if isinstance(warm, Runtime):
        return warm
    # A selection in a child process leaves its verdict and artifacts in the cache, so this process
    # starts warm: it never holds torch, the reference network or the candidates that lost. Not when
    # the network serves anyway (torch won before), nor where no warm start can be.
    if settings.select_in_subprocess and warm is _NotWarm.NOT_REMEMBERED:
        if selection_process is None:
            with SelectionProcess() as own_process:
                chosen = own_process.select(settings, source, cache_dir, phases)
        else:
            chosen = selection_process.select(settings, source, cache_dir, phases)
        if chosen is not None:
            with recording_cache_use() as use:
                warm = _warm_runtime(settings, source, cache_dir, calibration_set, phases, chosen)
            if isinstance(warm, Runtime):
                _remove_unserved_artifacts(source, chosen.built - use.handed_out)
                return warm
    return _cold_runtime(settings, source, cache_dir, calibration_set, phases)


def _remove_unserved_artifacts(source: ModelSource, entries: frozenset[Path]) -> None:
    """Removes what the selection built that the warm start from its choice did not read: the artifacts
    of the candidates that lost, most of a first start's cache (benchmarks/RESULTS.md, "Start-up to
    SERVING and memory"). A later start reads only what the remembered choice needs; one that selects
    afresh (other library versions or settings, or --reselect) builds its candidates again."""
    entries = frozenset(entry for entry in entries if entry.exists())  # not those another start removed
    if not entries:
        return
    freed = remove_entries(entries)
    logger.info(
        "removed %d cached artifacts (%.0f MB) that only the candidates which lost for %s read: %s",
        len(entries),
        freed / 1e6,
        source.model_id,
        ", ".join(sorted(entry.name for entry in entries)),
    )


def clear_unused_cache(cache_dir: Path, retention_days: int) -> None:
    """Removes from ``cache_dir`` the artifacts no start has used for ``retention_days`` and the builds
    stopped starts left unfinished (``remove_unused_entries``), and logs what went; a volume that
    refuses is a warning, never a failed start."""
    try:
        removed = remove_unused_entries(cache_dir, retention_days)
    except OSError as exc:
        logger.warning("could not clear unused artifacts from --cache-dir %s: %s", cache_dir, exc)
        return
    if removed.unused:
        logger.info(
            "removed %d cached artifacts (%.0f MB) that no start had used for %d days "
            "(--cache-retention-days): %s",
            len(removed.unused),
            removed.unused_bytes / 1e6,
            retention_days,
            ", ".join(removed.unused),
        )
    if removed.abandoned_builds:
        logger.info(
            "removed %d unfinished builds (%.0f MB) that stopped starts left in --cache-dir",
            removed.abandoned_builds,
            removed.abandoned_bytes / 1e6,
        )


class _NotWarm(enum.Enum):
    """Why a start is not a warm one."""

    CANNOT = "cannot"  # nothing remembered could serve it (a hub id, --engine torch, a GPU, ...)
    NOT_REMEMBERED = "not remembered"  # nothing (or nothing valid) is remembered for it yet
    NEEDS_NETWORK = "needs network"  # the remembered engine runs the PyTorch network


@dataclass(frozen=True)
class ChildSelection:
    """What the selection child did for a model: whether it found the choice remembered, and the cache
    entries it built."""

    from_cache: bool
    built: frozenset[Path]


class SelectionProcess:
    """A child process that selects engines for first starts, one model after another, and leaves each
    verdict and its artifacts in the cache for this process to start warm from. It is spawned when the
    first model needs it and serves every model of the start, so its interpreter and its imports (torch,
    transformers, onnx) are paid once; ``close`` lets it exit."""

    def __init__(self, work: Callable[[Settings, Connection], None] | None = None) -> None:
        # The child's whole life (``_select_each``; tests give their own).
        self._work = work or _select_each
        self._child: multiprocessing.process.BaseProcess | None = None
        self._connection: Connection | None = None
        self._selecting = False
        self._closed = False

    def __enter__(self) -> SelectionProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def select(
        self, settings: Settings, source: ModelSource, cache_dir: Path, phases: PhaseTimer
    ) -> ChildSelection | None:
        """Select the model's engine in the child; what it did, or None when it died (the reason logged),
        for this process to select instead."""
        if self._connection is None:
            context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of this one
            self._connection, child_end = context.Pipe()
            self._child = context.Process(
                target=self._work, args=(settings, child_end), name="engine-selection"
            )
            self._child.start()
            child_end.close()
        assert self._child is not None
        logger.info("selecting the engine for %s in child process %s", source.model_id, self._child.pid)
        self._selecting = True
        try:
            self._connection.send((settings, source, cache_dir))
            outcome: tuple[str, Any] = self._connection.recv()
        except (EOFError, OSError):
            if self._closed:  # the start was stopped: nobody waits for this model any more
                raise ModelLoadError(
                    f"the start stopped while the engine for {source.model_id} was selected"
                ) from None
            self._child.join()
            logger.warning(
                "the engine selection's process for %s exited with code %s; selecting in this process",
                source.model_id,
                self._child.exitcode,
            )
            self._connection = None
            return None
        finally:
            self._selecting = False
        status, detail = outcome
        if status == "failed":
            raise ModelLoadError(detail)
        seconds, from_cache, built = detail
        phases.add(seconds)
        logger.info(
            "the engine selection's process chose for %s; its peak RSS so far was %s",
            source.model_id,
            _peak_rss(self._child.pid),
        )
        return ChildSelection(bool(from_cache), frozenset(Path(entry) for entry in built))

    def close(self) -> None:
        """Let the child exit, if one was started, or stop it in the middle of a selection, which nobody
        waits for any more (the start is failing or being stopped); it is reaped in the background."""
        if self._connection is None or self._child is None:
            return
        self._closed = True
        if self._selecting:
            self._child.terminate()
        else:
            with contextlib.suppress(OSError):  # it exited already
                self._connection.send(None)
        self._connection.close()
        self._connection = None
        threading.Thread(target=self._child.join, name="engine-selection-reaper", daemon=True).start()


def _peak_rss(pid: int | None) -> str:
    """A process's peak resident memory, as the kernel reports it: what a memory limit must leave room
    for while the child and this process both run."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "not known here"
    peak = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return "not known here" if peak is None else f"{int(peak) / 1024:.0f} MB"


def _select_each(settings: Settings, requests: Connection) -> None:
    """The child process's whole life: for each model asked for, a cold start's load and selection, which
    remember in the cache directory given (the parent's, checked usable) what a warm start needs; then the
    phases' seconds, or the load error, go back to the parent. Until the parent sends None."""
    configure_logging(settings)
    while (request := requests.recv()) is not None:
        model_settings, source, cache_dir = request
        phases = PhaseTimer()
        try:
            calibration = read_calibration(model_settings.calibration_file)
            with recording_cache_use() as use:
                runtime = _cold_runtime(model_settings, source, cache_dir, calibration, phases)
        except ModelLoadError as exc:
            requests.send(("failed", str(exc)))
            continue
        from_cache = runtime.selection.from_cache
        runtime.engine.close()
        del runtime  # the next model's selection starts from what a fresh child would hold
        release_unused_memory()
        requests.send(("selected", (phases.seconds, from_cache, sorted(str(entry) for entry in use.built))))


def _warm_obstacle(settings: Settings, source: ModelSource) -> str | None:
    """Why this start cannot be a warm one whatever the cache holds, or None."""
    if settings.engine in NETWORK_ENGINES:
        return f"--engine {settings.engine}, which runs the PyTorch network"
    if settings.reselect:
        return "--reselect"
    if not source.is_local:
        return f"{source.name} is not a local directory"
    if warm_device(settings.device) is None:
        return f"--device {settings.device}: which device serves is for torch to say"
    return None


def calibration_unused_reason(settings: Settings) -> str | None:
    """Why this start's settings, on this machine, leave ``--calibration-file`` unused (only OpenVINO's
    static int8 on the CPU calibrates), or None where it may be used. Unknown until torch resolves
    ``--device auto`` beside an NVIDIA driver: None then."""
    if settings.engine not in ("auto", "openvino"):
        return f"--engine {settings.engine} has no static int8, the only candidate that calibrates"
    if settings.precision not in ("auto", "int8"):
        return f"--precision {settings.precision} leaves out static int8, the only candidate that calibrates"
    if warm_device(settings.device) is None:  # CUDA asked for, or auto beside an NVIDIA driver
        on_cuda = f"static int8 runs on the CPU, and --device is {settings.device}"
        return None if settings.device == "auto" else on_cuda
    withheld = int8_withheld_reason()
    return None if withheld is None else f"static int8 is not offered here: {withheld}"


def warm_device(requested: str) -> str | None:
    """The device as ``resolve_device`` would name it, where that needs no torch: the CPU when asked for
    or when no NVIDIA driver is loaded; None otherwise."""
    if requested == "cpu" or (requested == "auto" and not _NVIDIA_DRIVER.exists()):
        return "cpu"
    return None


def _warm_runtime(
    settings: Settings,
    source: ModelSource,
    cache_dir: Path,
    calibration_set: CalibrationSet,
    phases: PhaseTimer,
    chosen_by_child: ChildSelection | None = None,
) -> Runtime | _NotWarm:
    """The runtime rebuilt from what a cold start remembered, or why not (the reason logged); after the
    selection child, from what it chose (remembered by it, or selected afresh)."""
    obstacle = _warm_obstacle(settings, source)
    if obstacle is not None:
        logger.info("loading %s in full: %s", source.model_id, obstacle)
        return _NotWarm.CANNOT
    device = warm_device(settings.device)
    assert device is not None
    model_dir = Path(source.name)
    store = WarmStore(cache_dir)
    with phases.timed("load"):
        files = model_files(model_dir)
        key = _warm_key(settings, files)
        record, why_not = store.recall(model_dir, files, key)
        if record is not None:
            try:
                model = rebuild_model(record, source, store.tokenizer(key), settings.instruction)
            except ModelLoadError as exc:
                record, why_not = None, str(exc)
    if record is None and why_not.startswith(NEEDS_NETWORK):
        if settings.engine == "auto":  # the choice torch won applies only where the engine is chosen
            logger.info("loading %s in full: %s", source.model_id, why_not)
            return _NotWarm.NEEDS_NETWORK
        why_not = f"{why_not}, and --engine {settings.engine} asks for another"
    if record is None:
        # A first start is no surprise; a record that no longer holds is.
        level = logging.WARNING if store.remembers(model_dir) else logging.INFO
        logger.log(level, "loading %s in full, as on a first start: %s", source.model_id, why_not)
        return _NotWarm.NOT_REMEMBERED
    threads = settings.threads or record.default_threads
    workers = batch_workers(settings.batch_workers, device, threads)
    request = engine_request(
        settings, device, model.max_length, max(1, threads // workers), workers, cache_dir
    )
    probe, outputs = _probe(model, record.vocab_size, request)
    cache = ArtifactCache(cache_dir, reuse_only=True)
    try:
        exported = cached_export(record.export, record.input_names, cache)
    except ModelLoadError as exc:
        logger.warning("loading %s in full, as on a first start: %s", source.model_id, exc)
        return _NotWarm.NOT_REMEMBERED
    inputs = EngineInputs(
        None,
        record.model_hash,
        record.input_names,
        cache,
        exported=exported,
        calibration=model_calibration(model, calibration_set),
    )
    selection, why_not = select_remembered(request, inputs, probe, phases)
    if selection is None:
        logger.warning("loading %s in full, as on a first start: %s", source.model_id, why_not)
        return _NotWarm.NOT_REMEMBERED
    if chosen_by_child is not None:
        selection.from_cache = chosen_by_child.from_cache
    release_unused_memory()
    return _serving_runtime(settings, source, model, selection, request, workers, phases, outputs)


def _cold_runtime(
    settings: Settings,
    source: ModelSource,
    cache_dir: Path,
    calibration_set: CalibrationSet,
    phases: PhaseTimer,
) -> Runtime:
    """The model loaded through transformers and the engine selected (or remembered) with torch at hand."""
    import torch

    from sidecar.model.engines.torch_engine import resolve_device

    device = resolve_device(settings.device)
    threads = settings.threads or _default_threads()
    workers = batch_workers(settings.batch_workers, device, threads)
    threads_per_worker = max(1, threads // workers)
    # Loading and the parity gates use every thread; the selection times candidates and compiles on one
    # worker's share, which serving then keeps (process-wide, and read when TorchInductor generates
    # kernels, so it is set before anything compiles in the background).
    torch.set_num_threads(threads)
    with phases.timed("load"):
        # The files as read, to be remembered with the engine built from them (not as they are after).
        files_read = model_files(Path(source.name)) if source.is_local else {}
        model = load_model(source, settings.max_length, settings.instruction)
        network = load_model_network(model)
    input_names = ("input_ids", "attention_mask", "token_type_ids")
    input_names = input_names if model.uses_token_type_ids else input_names[:2]
    vocab_size = network.model.get_input_embeddings().num_embeddings
    request = engine_request(settings, device, model.max_length, threads_per_worker, workers, cache_dir)
    probe, outputs = _probe(model, vocab_size, request)
    calibration = model_calibration(model, calibration_set)
    selection = select_engine(request, network, input_names, probe, phases, calibration)
    torch.set_num_threads(threads_per_worker)
    del network  # the fp32 reference: the engine that serves holds what it needs
    if source.is_local:
        model_dir = Path(source.name)
        _remember_for_warm_starts(
            settings, model_dir, files_read, cache_dir, model, selection, vocab_size, input_names
        )
    release_unused_memory()
    return _serving_runtime(settings, source, model, selection, request, workers, phases, outputs)


def _remember_for_warm_starts(
    settings: Settings,
    model_dir: Path,
    files: dict[str, str],
    cache_dir: Path,
    model: CrossEncoderModel | BiEncoderModel,
    selection: Selection,
    vocab_size: int,
    input_names: tuple[str, ...],
) -> None:
    """What the next start needs to serve this engine without torch, with the model ``files`` it was
    built from; when torch won the selection, that it did (the next start then loads in full at once);
    nothing (and no stale record) for torch asked for by name, an engine built from no export, or files
    that changed while this start read them."""
    store = WarmStore(cache_dir)
    network = selection.engine.name in NETWORK_ENGINES
    if (network and settings.engine != "auto") or (not network and selection.exported is None):
        store.forget(model_dir)
        return
    files_now = model_files(model_dir)
    if files_now != files:
        store.forget(model_dir)
        logger.warning(
            "%s changed while it loaded, so nothing is remembered and the next start loads it in full: %s",
            model_dir,
            differing_files(model_dir, files, files_now),
        )
        return
    key = _warm_key(settings, files)
    if network:
        engine = f"{selection.engine.name}/{selection.engine.precision}"
        store.remember_network(model_dir, files, key, engine)
        return
    assert selection.exported is not None
    record = record_of(
        model,
        model_hash=selection.model_hash,
        vocab_size=vocab_size,
        input_names=input_names,
        default_threads=_default_threads(),
        exported=selection.exported,
    )
    store.remember(model_dir, files, key, record, model.tokenizer)


def _warm_key(settings: Settings, files: dict[str, str]) -> dict[str, str]:
    return warm_key(
        files,
        max_length_cap=settings.max_length,
        instruction=settings.instruction,
        trust_remote_code=settings.trust_remote_code,
    )


def _probe(
    model: CrossEncoderModel | BiEncoderModel, vocab_size: int, request: EngineRequest
) -> tuple[Probe, str]:
    """The parity gate's probe for the model, in the batcher's batch shapes, and how its outputs are
    described in the log."""
    kind = kind_of(model)
    probe = kind.probe(model, vocab_size, request.max_batch_pairs, request.max_batch_tokens)
    return probe, kind.describe_outputs(model)


def _serving_runtime(
    settings: Settings,
    source: ModelSource,
    model: CrossEncoderModel | BiEncoderModel,
    selection: Selection,
    request: EngineRequest,
    workers: int,
    phases: PhaseTimer,
    outputs: str,
) -> Runtime:
    engine = selection.engine
    workers = serving_workers(settings.batch_workers, workers, engine)
    max_batch_tokens = served_batch_tokens(
        settings.max_batch_tokens, request.max_batch_tokens, engine, model.max_length
    )
    hardware = describe_device(request.device)
    logger.info(
        "loaded %s (%s %s, %s, max_length %d) on %s/%s/%s (%s%s), batches of up to %d tokens on %d "
        "worker(s) of %d thread(s); parity %s",
        source.model_id,
        model.model_type,
        model.kind.value,
        outputs,
        model.max_length,
        engine.name,
        engine.precision,
        engine.device,
        hardware,
        ", remembered choice" if selection.from_cache else "",
        max_batch_tokens,
        workers,
        request.threads,
        selection.parity.describe(),
    )
    return Runtime(
        model,
        engine,
        max_batch_tokens,
        request.max_batch_pairs,
        workers,
        selection,
        phases,
        hardware,
        settings.lossy_margin,
    )
