"""Loading what serves requests: the model's metadata and tokenizer, and an engine with its weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from sidecar.model.engines import Engine
from sidecar.model.engines.selection import EngineRequest, select_engine
from sidecar.model.engines.torch_engine import resolve_device
from sidecar.model.loading import CrossEncoderModel, ModelSource, load_cross_encoder
from sidecar.model.network import ModelKind, load_network
from sidecar.model.parity import cross_encoder_probe
from sidecar.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    model: CrossEncoderModel
    engine: Engine
    # Why engines ahead of the serving one in the fallback chain were skipped.
    engine_notes: tuple[str, ...] = ()


def engine_request(settings: Settings, max_length: int) -> EngineRequest:
    return EngineRequest(
        engine=settings.engine,
        precision=settings.precision,
        device=resolve_device(settings.device),
        threads=settings.threads,
        max_batch_pairs=settings.max_batch_pairs,
        max_batch_tokens=settings.max_batch_tokens,
        max_length=max_length,
        cache_dir=Path(settings.cache_dir).expanduser(),
    )


def load_runtime(settings: Settings) -> Runtime:
    """Blocking: reads files and weights, exports and compiles. The server calls it on a worker thread."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    source = ModelSource(settings.model, settings.revision)
    model = load_cross_encoder(source, settings.max_length)
    network = load_network(source, ModelKind.CROSS_ENCODER)
    input_names = ("input_ids", "attention_mask", "token_type_ids")
    input_names = input_names if model.uses_token_type_ids else input_names[:2]
    selection = select_engine(
        engine_request(settings, model.max_length),
        network,
        input_names,
        cross_encoder_probe(model, settings.max_batch_pairs),
    )
    engine = selection.engine
    logger.info(
        "loaded %s (%s, %d label(s), max_length %d) on %s/%s/%s; parity %s",
        source.name,
        model.model_type,
        model.num_labels,
        model.max_length,
        engine.name,
        engine.precision,
        engine.device,
        selection.parity.describe(),
    )
    return Runtime(model, engine, tuple(selection.notes))
