"""The unit the scheduler hands an engine: padded token arrays for a batch of pairs."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class EncodedPair:
    """One (query, document-or-chunk) pair, special tokens included, no padding."""

    input_ids: list[int]
    token_type_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True, slots=True)
class TokenBatch:
    """Right-padded int64 arrays of shape [pairs, longest pair]."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None

    @property
    def shape(self) -> tuple[int, int]:
        rows, columns = self.input_ids.shape
        return rows, columns

    def as_dict(self) -> dict[str, np.ndarray]:
        arrays = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            arrays["token_type_ids"] = self.token_type_ids
        return arrays


def collate(pairs: Sequence[EncodedPair], pad_token_id: int, with_token_type_ids: bool) -> TokenBatch:
    longest = max(len(pair) for pair in pairs)
    input_ids = np.full((len(pairs), longest), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(pairs), longest), dtype=np.int64)
    token_type_ids = np.zeros((len(pairs), longest), dtype=np.int64) if with_token_type_ids else None
    for row, pair in enumerate(pairs):
        length = len(pair)
        input_ids[row, :length] = pair.input_ids
        attention_mask[row, :length] = 1
        if token_type_ids is not None:
            token_type_ids[row, :length] = pair.token_type_ids
    return TokenBatch(input_ids, attention_mask, token_type_ids)


def batches_digest(batches: Sequence[TokenBatch]) -> str:
    """A short digest of the batches' tokens: a cache key part for what was computed from them."""
    digest = hashlib.sha256()
    for batch in batches:
        for array in batch.as_dict().values():
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]
