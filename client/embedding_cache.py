"""Passage embeddings saved batch by batch, so that an interrupted ingest resumes instead of re-embedding."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class EmbeddingCache:
    """Vectors by the hash of the text they embed, in one ``.npz`` shard per computed batch.

    Keep one directory per embedding model: the keys say which text, not which model.
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._vectors: dict[str, np.ndarray] = {}
        shards = sorted(self.directory.glob("shard-*.npz"))
        for shard in shards:
            with np.load(shard) as saved:
                self._vectors.update(zip(saved["keys"].tolist(), saved["vectors"], strict=True))
        self._next_shard = len(shards)

    def __len__(self) -> int:
        return len(self._vectors)

    def __contains__(self, text: str) -> bool:
        return text_key(text) in self._vectors

    def embed(self, texts: Sequence[str], compute: Callable[[Sequence[str]], np.ndarray]) -> np.ndarray:
        """The vectors of ``texts``: saved ones as they are, the rest from ``compute`` (then saved)."""
        keys = [text_key(text) for text in texts]
        missing = {key: text for key, text in zip(keys, texts, strict=True) if key not in self._vectors}
        if missing:
            vectors = np.asarray(compute(list(missing.values())), dtype=np.float32)
            if len(vectors) != len(missing):
                raise RuntimeError(f"the embedder returned {len(vectors)} vectors for {len(missing)} texts")
            self._save(list(missing), vectors)
            self._vectors.update(zip(missing, vectors, strict=True))
        return np.stack([self._vectors[key] for key in keys])

    def _save(self, keys: list[str], vectors: np.ndarray) -> None:
        path = self.directory / f"shard-{self._next_shard:06d}.npz"
        # Written under another name, then renamed: an interrupted write never leaves a broken shard.
        partial = path.with_name(f"partial-{path.name}")
        np.savez(partial, keys=np.array(keys), vectors=vectors)
        os.replace(partial, path)
        self._next_shard += 1
