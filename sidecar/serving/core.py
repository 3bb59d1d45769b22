"""The serving core: the served models' lifecycle and the requests they answer, free of any transport.

A transport (gRPC, HTTP/JSON) only converts its messages, asks the core for the ``Reranker`` or
``Embedder``, and maps ``ServingError`` to its status codes. The composition root (``sidecar.composition``)
builds the models and hands them over ready; tests and benchmarks can drive the core with no server.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from sidecar import __version__
from sidecar.errors import ModelNotServed, NotReady
from sidecar.model.engines import Engine
from sidecar.model.engines.selection import Upgrade
from sidecar.model.kinds import kind_of
from sidecar.model.loading import BiEncoderModel, CrossEncoderModel
from sidecar.model.memory import HeapTrimmer
from sidecar.scheduling.batcher import Batcher
from sidecar.scheduling.tokenizer_pool import TokenizerPool
from sidecar.serving.embedding import Embedder
from sidecar.serving.info import EmbeddingInfo, ModelInfo, RankingInfo, SelectionInfo, ServingInfo
from sidecar.serving.metrics import Metrics
from sidecar.serving.reranking import Reranker
from sidecar.serving.scoring import Scorer
from sidecar.settings import Settings, model_entries

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ServingState(enum.Enum):
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ServedModel:
    """One model, loaded and warmed up: its batcher (the one holder of the engine serving now), how it
    scores, and how its engine was chosen."""

    # What requests and metrics call it: the name it was given, or its id.
    name: str
    model: CrossEncoderModel | BiEncoderModel
    batcher: Batcher
    scorer: Scorer
    selection: SelectionInfo
    # Why engines ahead of the serving one were skipped; a compile in the background may add one.
    engine_notes: list[str]
    # Compiles the engine and gates it, for a compiled engine to take over once serving (or None).
    upgrade: Upgrade | None

    @property
    def engine(self) -> Engine:
        """The engine serving now: the one chosen at start, or the compiled one that took over."""
        return self.batcher.engine


@dataclass(frozen=True)
class ServedModels:
    """What the core serves, by the names requests choose them by (the default first), and the process
    resources it stops when it closes. One model may serve under several names and both services."""

    ranking: dict[str, ServedModel]
    rerankers: dict[str, Reranker]
    embedding: dict[str, ServedModel]
    embedders: dict[str, Embedder]
    tokenizer_pool: TokenizerPool
    heap_trimmer: HeapTrimmer

    @property
    def distinct(self) -> list[ServedModel]:
        """Each served model once."""
        return list(
            {id(served): served for served in (*self.ranking.values(), *self.embedding.values())}.values()
        )


def _chosen(served: Mapping[str, T], requested: str, service: str) -> T:
    """The model a request names, or the default (the first) when it names none."""
    if not requested:
        return next(iter(served.values()))
    if requested not in served:
        raise ModelNotServed(
            f"model {requested!r} is not served here; the {service} models served are: "
            + ", ".join(repr(name) for name in served)
            + " (send one of these, or no model for the first)"
        )
    return served[requested]


class ServingCore:
    """The Rerankers, and the Embedders when embedding models are set, with their lifecycle: LOADING
    until ``serve`` hands it the models, then ``begin_draining`` and ``close``; and ``info``."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state = ServingState.LOADING
        self.models: ServedModels | None = None
        self._created = time.monotonic()
        self._compiling: threading.Thread | None = None

    @property
    def ranking(self) -> ServedModel | None:
        """The default reranker's model."""
        return None if self.models is None else next(iter(self.models.ranking.values()))

    @property
    def reranker(self) -> Reranker | None:
        """The default Reranker."""
        return None if self.models is None else next(iter(self.models.rerankers.values()))

    @property
    def embedding(self) -> ServedModel | None:
        """The default embedder's model, if any."""
        return None if self.models is None else next(iter(self.models.embedding.values()), None)

    @property
    def embedder(self) -> Embedder | None:
        """The default Embedder, if any."""
        return None if self.models is None else next(iter(self.models.embedders.values()), None)

    @property
    def served(self) -> list[ServedModel]:
        """Each model served, once; none while loading."""
        return [] if self.models is None else self.models.distinct

    @property
    def serves_embeddings(self) -> bool:
        """Whether the Embedder is offered (an embedding model is set), loaded or not yet."""
        return bool(model_entries("--embed-model", self.settings.embed_model))

    def require_reranker(self, model: str = "") -> Reranker:
        """The Reranker of the model a request names (its ``model`` field), or the default's."""
        self._check_serving()
        if self.models is None:
            raise NotReady("the model is still loading; wait until the health service reports SERVING")
        return _chosen(self.models.rerankers, model, "reranking")

    def require_embedder(self, model: str = "") -> Embedder:
        """The Embedder of the model a request names, or the default's."""
        self._check_serving()
        if self.models is None or not self.models.embedders:
            raise NotReady("the model is still loading; wait until the health service reports SERVING")
        return _chosen(self.models.embedders, model, "embedding")

    def _check_serving(self) -> None:
        if self.state in (ServingState.DRAINING, ServingState.STOPPED):
            raise NotReady("this server is shutting down; retry on another replica")

    def serve(self, models: ServedModels) -> None:
        """Start serving ``models``, ready and warmed up; compiles wanted later begin in the background."""
        self.models = models
        self.state = ServingState.SERVING
        models.heap_trimmer.start()
        self._upgrade_in_background(models.distinct)
        logger.info(
            "serving %s%s, %.1f s after the server started",
            ", ".join(f"{name} ({served.model.kind.value})" for name, served in models.ranking.items()),
            f" and embeddings from {', '.join(models.embedding)}" if models.embedding else "",
            time.monotonic() - self._created,
        )

    def _upgrade_in_background(self, served_models: list[ServedModel]) -> None:
        """Compile the serving engines off the event loop (--torch-compile auto), one model after the
        other, and let each compiled engine take over once it passes the gate. A daemon thread: a stop
        never waits for a compile."""
        pending = [(served, served.upgrade) for served in served_models if served.upgrade is not None]
        if not pending:
            return

        def compile_and_swap() -> None:
            for served, upgrade in pending:
                name = served.name  # as the metrics and the other log lines call it
                started = time.perf_counter()
                try:
                    upgraded = upgrade()
                except Exception:  # a failed upgrade must never take down the engine already serving
                    logger.exception("compiling %s in the background failed", name)
                    continue
                if self.state is not ServingState.SERVING:
                    return
                if upgraded is None:
                    continue
                served.batcher.replace_engine(upgraded[0])  # batches already running finish uncompiled
                logger.info(
                    "%s now serves compiled (%s/%s), after %.1f s of compiling in the background",
                    name,
                    upgraded[0].name,
                    upgraded[0].precision,
                    time.perf_counter() - started,
                )

        self._compiling = threading.Thread(target=compile_and_swap, name="compile", daemon=True)
        self._compiling.start()

    @property
    def compiling(self) -> bool:
        """Whether a background compile is still running (it cannot be interrupted)."""
        return self._compiling is not None and self._compiling.is_alive()

    def begin_draining(self) -> None:
        """Refuse new requests from now on; requests already admitted run to completion."""
        if self.state is not ServingState.STOPPED:
            self.state = ServingState.DRAINING

    async def close(self) -> None:
        """Fail whatever still waits, stop the batchers, and release the engines and threads."""
        self.state = ServingState.STOPPED
        if self.models is None:
            return
        self.models.heap_trimmer.stop()
        for served in self.models.distinct:
            await served.batcher.close()
        await self.models.tokenizer_pool.close()

    def info(self) -> ServingInfo:
        reranker = self.require_reranker()
        models, ranking, embedding = self.models, self.ranking, self.embedding
        assert models is not None
        assert ranking is not None
        model, engine, limits = ranking.model, ranking.engine, ranking.batcher.limits
        embedding_info = None
        if self.embedder is not None and embedding is not None:
            embed_model, embed_engine = self.embedder.model, embedding.engine
            embedding_info = EmbeddingInfo(
                model_id=embed_model.source.model_id,
                dims=embed_model.dims,
                pooling=embed_model.pooling.mode,
                normalized=embed_model.pooling.normalize,
                max_length=embed_model.max_length,
                engine=embed_engine.name,
                precision=embed_engine.precision,
                device=embed_engine.device,
                compiled=embed_engine.compiled,
                selection=embedding.selection,
            )
        return ServingInfo(
            ranking=RankingInfo(
                model_id=model.source.model_id,
                model_revision=model.revision,
                model_kind=model.kind.value,
                engine=engine.name,
                precision=engine.precision,
                device=engine.device,
                max_length=model.max_length,
                num_labels=kind_of(model).num_labels(model),
                max_batch_tokens=limits.max_batch_tokens,
                batch_workers=ranking.batcher.workers,
                max_batch_pairs=limits.max_batch_pairs,
                max_queued_pairs=limits.max_queued_pairs,
                max_documents_per_request=reranker.limits.max_documents_per_request,
                max_chunks_per_doc=reranker.limits.max_chunks_per_doc,
                engine_notes=tuple(ranking.engine_notes),
                compiled=engine.compiled,
                selection=ranking.selection,
                model_family=model.family,
                instruction=model.tokenizer.instruction,
                score_cache=ranking.scorer.score_cache.info(engine),
            ),
            embedding=embedding_info,
            server_version=__version__,
            models=(
                *(
                    _model_info(name, "rerank", served, models.ranking)
                    for name, served in models.ranking.items()
                ),
                *(
                    _model_info(name, "embed", served, models.embedding)
                    for name, served in models.embedding.items()
                ),
            ),
            tokenize_in="processes" if models.tokenizer_pool.processes else "threads",
            tokenizer_workers=models.tokenizer_pool.workers,
        )


def _model_info(
    name: str, service: str, served: ServedModel, of_service: Mapping[str, ServedModel]
) -> ModelInfo:
    model, engine, limits = served.model, served.engine, served.batcher.limits
    embedding = kind_of(model).embedding_model(model) if service == "embed" else None
    return ModelInfo(
        name=name,
        service=service,
        default=name == next(iter(of_service)),
        model_id=model.source.model_id,
        model_kind=model.kind.value,
        model_family=model.family,
        engine=engine.name,
        precision=engine.precision,
        device=engine.device,
        compiled=engine.compiled,
        max_length=model.max_length,
        max_batch_tokens=limits.max_batch_tokens,
        max_batch_pairs=limits.max_batch_pairs,
        batch_workers=served.batcher.workers,
        score_cache=served.scorer.score_cache.info(engine) if service == "rerank" else None,
        dims=embedding.dims if embedding is not None else 0,
        pooling=embedding.pooling.mode if embedding is not None else "",
        normalized=embedding.pooling.normalize if embedding is not None else False,
    )
