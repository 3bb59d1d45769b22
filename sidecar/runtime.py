"""Loading what serves requests: the model's metadata and tokenizer, and an engine with its weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sidecar.model.engines import Engine, load_engine
from sidecar.model.loading import CrossEncoderModel, ModelSource, load_cross_encoder
from sidecar.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    model: CrossEncoderModel
    engine: Engine


def load_runtime(settings: Settings) -> Runtime:
    """Blocking: reads files and weights. The server calls it on a worker thread."""
    source = ModelSource(settings.model, settings.revision)
    model = load_cross_encoder(source, settings.max_length)
    engine = load_engine(settings.engine, source, device=settings.device, threads=settings.threads)
    logger.info(
        "loaded %s (%s, %d label(s), max_length %d) on %s/%s/%s",
        source.name,
        model.model_type,
        model.num_labels,
        model.max_length,
        engine.name,
        engine.precision,
        engine.device,
    )
    return Runtime(model, engine)
