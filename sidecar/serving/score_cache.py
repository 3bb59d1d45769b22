"""The exact score cache: a document's pooled raw score, kept for the next request that asks the same.

One entry per (query, document) pair, in an LRU of ``--score-cache-size`` entries. The key digests
everything that changes the score: the model, the serving engine (name, precision, device, whether
compiled), the query, the document's text and the tokenization spec (max_length, truncation, chunking,
instruction, truncate); only digests are kept, never the texts. The value is the document's raw score,
pooled over its chunks and before normalization, so both a raw and a normalized answer derive from it
exactly as from a freshly computed one, and ``raw_scores`` needs no place in the key.

Only an engine whose outputs do not depend on what shares their batch (``Engine.batch_variance``
empty) uses it: otherwise a cached score would be one of several the engine could give. The cache holds
one engine's scores: when a compiled engine takes over (``Batcher.replace_engine``), the first request
that sees it drops the entries of the engine before, whatever the two engines are called.

It lives on the event loop, as the Reranker does, so it needs no lock.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence

from sidecar.model.engines.base import Engine
from sidecar.model.loading import TextModel
from sidecar.model.tokenization import PairSpec
from sidecar.serving.info import ScoreCacheInfo

_DIGEST_BYTES = 16


def _digest_parts(parts: Sequence[str | int | bool]) -> bytes:
    """One digest of ``parts``, each length-prefixed, so no two different sequences share an encoding."""
    digest = hashlib.blake2b(digest_size=32)
    for part in parts:
        data = str(part).encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.digest()


class ScoreCache:
    """An LRU of pooled raw scores by (model, engine, spec, query, document) digest; ``max_pairs`` 0 is
    off. ``hits`` and ``misses`` count lookups since start, for the metrics."""

    def __init__(self, max_pairs: int) -> None:
        if max_pairs < 0:
            raise ValueError(f"a score cache holds 0 or more pairs, not {max_pairs}")
        self.max_pairs = max_pairs
        self.hits = 0
        self.misses = 0
        self._scores: OrderedDict[bytes, float] = OrderedDict()
        self._engine: Engine | None = None  # whose scores these are

    def __len__(self) -> int:
        return len(self._scores)

    def why_not_serving(self, engine: Engine) -> str:
        """Why the cache answers nothing for ``engine``; empty when it serves."""
        if not self.max_pairs:
            return "off: --score-cache-size is 0"
        if engine.batch_variance:
            return (
                f"off for {engine.name}/{engine.precision}, which is not batch-invariant: "
                f"{engine.batch_variance}"
            )
        return ""

    def use_engine(self, engine: Engine) -> bool:
        """Answer with and keep ``engine``'s scores from now on, dropping another engine's; returns whether
        the cache serves it at all."""
        if engine is not self._engine:
            self._scores.clear()
            self._engine = engine
        return not self.why_not_serving(engine)

    def info(self, engine: Engine) -> ScoreCacheInfo:
        why_not = self.why_not_serving(engine)
        return ScoreCacheInfo(
            serves=not why_not, max_pairs=self.max_pairs, pairs=len(self), why_not_serving=why_not
        )

    def keys(
        self, model: TextModel, engine: Engine, query: str, spec: PairSpec, documents: Sequence[str]
    ) -> list[bytes]:
        """Each document's key: a digest of its text, keyed by the digest of everything else."""
        context = _digest_parts(
            (
                model.source.name,
                model.revision,
                engine.name,
                engine.precision,
                engine.device,
                engine.compiled,
                spec.max_length,
                spec.truncation.value,
                spec.chunk,
                spec.max_chunks_per_doc,
                spec.chunk_overlap,
                spec.instruction,
                spec.truncate,
                query,
            )
        )
        return [
            hashlib.blake2b(
                document.encode("utf-8", "surrogatepass"), digest_size=_DIGEST_BYTES, key=context
            ).digest()
            for document in documents
        ]

    def get(self, keys: Sequence[bytes]) -> list[float | None]:
        """Each key's cached raw score, or None; a hit becomes the most recently used."""
        scores: list[float | None] = []
        for key in keys:
            score = self._scores.get(key)
            if score is not None:
                self._scores.move_to_end(key)
            scores.append(score)
        found = sum(score is not None for score in scores)
        self.hits += found
        self.misses += len(keys) - found
        return scores

    def put(self, keys: Sequence[bytes], scores: Sequence[float]) -> None:
        """Keep each finite score under its key, evicting the least recently used past ``max_pairs``."""
        for key, score in zip(keys, scores, strict=True):
            if not math.isfinite(score):
                continue
            self._scores[key] = score
            self._scores.move_to_end(key)
        while len(self._scores) > self.max_pairs:
            self._scores.popitem(last=False)
