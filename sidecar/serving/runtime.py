"""Loading what serves requests: the model's metadata and tokenizer, and an engine with its weights."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sidecar.errors import ModelLoadError
from sidecar.model.cache import usable_cache_dir
from sidecar.model.calibration import model_calibration, read_calibration
from sidecar.model.engines import Engine
from sidecar.model.engines.selection import EngineRequest, Selection, select_engine
from sidecar.model.engines.torch_engine import resolve_device
from sidecar.model.hardware import describe_device
from sidecar.model.loading import BiEncoderModel, CrossEncoderModel, ModelKind, ModelSource, load_model
from sidecar.model.network import load_model_network
from sidecar.model.parity import bi_encoder_probe, cross_encoder_probe
from sidecar.model.phases import PhaseTimer
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
# cache (benchmarks/RESULTS.md, "Engines and precisions", AMX runs 8-9).
_CPU_BATCH_TOKENS = 4096
_CUDA_BATCH_TOKENS = 8192
# Torch's own default (one per core, or OMP_NUM_THREADS), read before the server changes it.
_DEFAULT_THREADS = torch.get_num_threads()


def batch_token_budget(configured: int, device: str, max_length: int) -> int:
    """``--max-batch-tokens``, or when it is 0 the device's default, raised to fit one full-length input."""
    if configured:
        return configured
    default = _CPU_BATCH_TOKENS if device == "cpu" else _CUDA_BATCH_TOKENS
    return max(default, max_length)


def batch_workers(configured: int, device: str, threads: int) -> int:
    """``--batch-workers``, or when it is 0 the device's default: 2 on a CPU with 2 threads or more,
    where single-threaded batches never wait at each other's thread barriers (benchmarks/RESULTS.md,
    "Engines and precisions", AMX runs 8-9), and 1 on CUDA, whose kernels one stream serializes.
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
        max_batch_pairs=settings.max_batch_pairs,
        max_batch_tokens=batch_token_budget(settings.max_batch_tokens, device, max_length),
        max_length=max_length,
        cache_dir=cache_dir,
        torch_compile=settings.torch_compile,
        workers=workers,
        lossy_margin=settings.lossy_margin,
        reselect=settings.reselect,
    )


def load_runtime(settings: Settings, source: ModelSource) -> Runtime:
    """Blocking: reads files and weights, exports and compiles. The server calls it on a worker thread."""
    device = resolve_device(settings.device)
    threads = settings.threads or _DEFAULT_THREADS
    workers = batch_workers(settings.batch_workers, device, threads)
    threads_per_worker = max(1, threads // workers)
    # Loading and the parity gates use every thread; the selection times candidates and compiles on one
    # worker's share, which serving then keeps (process-wide, and read when TorchInductor generates
    # kernels, so it is set before anything compiles in the background).
    torch.set_num_threads(threads)
    # Checked before any library makes its own cache directory in it: one that cannot be written is a
    # warning, and a temporary directory stands in (torch._dynamo creates Inductor's on import).
    cache_dir = usable_cache_dir(Path(settings.cache_dir).expanduser())
    # TorchInductor's compiled kernels go beside the other compiled artifacts, on the mounted volume.
    # Inductor reads the variable once per process, so it is set before anything compiles or exports;
    # an operator's own setting wins.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))
    source = dataclasses.replace(source, trust_remote_code=settings.trust_remote_code)
    calibration_set = read_calibration(settings.calibration_file)  # a bad file stops the start first
    phases = PhaseTimer()
    with phases.timed("load"):
        model = load_model(source, settings.max_length, settings.instruction)
        network = load_model_network(model)
    input_names = ("input_ids", "attention_mask", "token_type_ids")
    input_names = input_names if model.uses_token_type_ids else input_names[:2]
    vocab_size = network.model.get_input_embeddings().num_embeddings
    if model.kind is ModelKind.CROSS_ENCODER:
        probe = cross_encoder_probe(model, settings.max_batch_pairs, vocab_size=vocab_size)  # type: ignore[arg-type]
        outputs = f"{model.num_labels} label(s)"
    else:
        probe = bi_encoder_probe(
            model.tokenizer,
            max_length=model.max_length,
            pad_token_id=model.pad_token_id,
            with_token_type_ids=model.uses_token_type_ids,
            max_batch=settings.max_batch_pairs,
            vocab_size=vocab_size,
        )
        outputs = f"{model.dims} dims, {model.pooling.mode} pooling"
    request = engine_request(settings, device, model.max_length, threads_per_worker, workers, cache_dir)
    calibration = model_calibration(model, calibration_set)
    selection = select_engine(request, network, input_names, probe, phases, calibration)
    torch.set_num_threads(threads_per_worker)
    engine = selection.engine
    workers = serving_workers(settings.batch_workers, workers, engine)
    hardware = describe_device(device)
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
        request.max_batch_tokens,
        workers,
        request.threads,
        selection.parity.describe(),
    )
    return Runtime(
        model,
        engine,
        request.max_batch_tokens,
        workers,
        selection,
        phases,
        hardware,
        settings.lossy_margin,
    )
