"""The unit the scheduler hands an engine: padded token arrays for a batch of pairs."""

from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# A row's token ids: a list from the tokenizer, or a view of ``PackedRows`` from a tokenizer process.
TokenIds = list[int] | np.ndarray


@dataclass(frozen=True, slots=True)
class EncodedPair:
    """One (query, document-or-chunk) pair, special tokens included, no padding."""

    input_ids: TokenIds
    token_type_ids: TokenIds

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True, slots=True)
class PackedRows:
    """Rows laid end to end in flat arrays: how they cross from a tokenizer process, as three buffers
    instead of a Python int per token, and how ``collate`` copies them, a row at a time."""

    input_ids: np.ndarray  # int32
    token_type_ids: np.ndarray  # int16
    ends: np.ndarray  # int64: where each row ends

    @classmethod
    def of(cls, pairs: Sequence[EncodedPair]) -> PackedRows:
        ends = np.cumsum([len(pair) for pair in pairs], dtype=np.int64)
        total = int(ends[-1]) if len(ends) else 0

        def flat(rows: Sequence[TokenIds], dtype: type[np.generic]) -> np.ndarray:
            return np.fromiter(itertools.chain.from_iterable(rows), dtype=dtype, count=total)

        return cls(
            flat([pair.input_ids for pair in pairs], np.int32),
            flat([pair.token_type_ids for pair in pairs], np.int16),
            ends,
        )

    def pairs(self) -> list[EncodedPair]:
        """The rows again, each a view of the flat arrays."""
        ids, types = self.input_ids, self.token_type_ids
        return [
            EncodedPair(ids[start:end], types[start:end])
            for start, end in itertools.pairwise([0, *self.ends.tolist()])
        ]


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

    def rows(self, start: int, stop: int) -> TokenBatch:
        """Rows ``start`` to ``stop`` (exclusive), keeping every column."""
        token_type_ids = None if self.token_type_ids is None else self.token_type_ids[start:stop]
        return TokenBatch(self.input_ids[start:stop], self.attention_mask[start:stop], token_type_ids)

    def padded_to(self, rows: int, columns: int, pad_token_id: int) -> TokenBatch:
        """The batch grown to ``rows`` x ``columns`` (see ``collate`` for what padding holds)."""
        if (rows, columns) == self.shape:
            return self
        had_rows, had_columns = self.shape
        grow = ((0, rows - had_rows), (0, columns - had_columns))
        attention_mask = np.pad(self.attention_mask, grow)
        attention_mask[had_rows:, 0] = 1
        token_type_ids = None if self.token_type_ids is None else np.pad(self.token_type_ids, grow)
        input_ids = np.pad(self.input_ids, grow, constant_values=pad_token_id)
        return TokenBatch(input_ids, attention_mask, token_type_ids)


def collate(
    pairs: Sequence[EncodedPair],
    pad_token_id: int,
    with_token_type_ids: bool,
    shape: tuple[int, int] | None = None,
) -> TokenBatch:
    """The pairs right-padded to the longest; with ``shape``, to that many rows and columns. A padding
    row attends to one padding token, so no row is all mask (which some attention kernels turn into
    NaN); its output is dropped."""
    lengths = np.fromiter((len(pair) for pair in pairs), dtype=np.int64, count=len(pairs))
    rows, columns = shape or (len(pairs), int(lengths.max()))
    # Each row's tokens fill its first ``length`` columns: one masked assignment of every row's tokens
    # laid end to end (row-major, as the mask is), not a copy per row.
    filled = np.arange(columns) < lengths[:, None]
    input_ids = np.full((rows, columns), pad_token_id, dtype=np.int64)
    input_ids[: len(pairs)][filled] = np.concatenate([pair.input_ids for pair in pairs])
    attention_mask = np.zeros((rows, columns), dtype=np.int64)
    attention_mask[: len(pairs)] = filled
    attention_mask[len(pairs) :, 0] = 1
    token_type_ids = None
    if with_token_type_ids:
        token_type_ids = np.zeros((rows, columns), dtype=np.int64)
        token_type_ids[: len(pairs)][filled] = np.concatenate([pair.token_type_ids for pair in pairs])
    return TokenBatch(input_ids, attention_mask, token_type_ids)


def bucket_bounds(smallest: int, largest: int) -> tuple[int, ...]:
    """Sizes from ``smallest`` up to ``largest`` (always included), doubling up to 8 and then in quarter
    octaves: each at most a quarter above the one before from 32 on, so padding a size up to the next
    wastes little."""
    bounds = []
    size = smallest
    while size < largest:
        bounds.append(size)
        octave = 1 << (size.bit_length() - 1)
        size = size * 2 if size < 8 else size + max(8, octave // 4)
    return (*bounds, largest)


@dataclass(frozen=True)
class ShapeBuckets:
    """The batch shapes (pairs x tokens) an engine is built for, e.g. one CUDA graph each: a batch runs
    padded to the smallest bucket that holds it.

    Every batch the batcher can form fits one: at most ``max_batch_pairs`` rows, and rows times the
    longest row within ``max_batch_tokens`` (or one row of up to ``max_length``). Rows start at 2, since
    compiled graphs specialize a size of 1.
    """

    max_batch_pairs: int
    max_batch_tokens: int
    max_length: int

    # Computed once: every batch is fitted on the serving path.
    @functools.cached_property
    def column_bounds(self) -> tuple[int, ...]:
        return bucket_bounds(min(8, self.max_length), self.max_length)

    @functools.cached_property
    def _row_bounds_of(self) -> dict[int, tuple[int, ...]]:
        """Row buckets of each column bucket: up to the rows its shortest member length allows."""
        shortest = [1, *(bound + 1 for bound in self.column_bounds[:-1])]
        return {
            bound: bucket_bounds(2, max(2, self.row_limit(length)))
            for bound, length in zip(self.column_bounds, shortest, strict=True)
        }

    def row_limit(self, columns: int) -> int:
        """The most rows a batch whose longest row is ``columns`` tokens can have."""
        return max(1, min(self.max_batch_pairs, self.max_batch_tokens // columns))

    def row_bounds(self, column_bound: int) -> tuple[int, ...]:
        """Row buckets of a column bucket: up to the rows its shortest member length allows."""
        return self._row_bounds_of[column_bound]

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        """Every bucket, largest first."""
        every = [(rows, columns) for columns in self.column_bounds for rows in self.row_bounds(columns)]
        return tuple(sorted(every, key=lambda shape: (shape[0] * shape[1], shape), reverse=True))

    def fit(self, rows: int, columns: int) -> tuple[int, int]:
        """The smallest bucket holding a batch of ``rows`` x ``columns``; a ValueError for a batch the
        batcher cannot form."""
        column_bound = next((bound for bound in self.column_bounds if bound >= columns), None)
        if column_bound is None:
            raise ValueError(f"a batch row of {columns} tokens is over the max length {self.max_length}")
        row_bound = next((bound for bound in self.row_bounds(column_bound) if bound >= rows), None)
        if row_bound is None:
            raise ValueError(
                f"a batch of {rows} rows of up to {columns} tokens is larger than any bucket "
                f"(at most {self.row_limit(columns)} rows of that length)"
            )
        return row_bound, column_bound


def batches_digest(batches: Sequence[TokenBatch]) -> str:
    """A short digest of the batches' tokens: a cache key part for what was computed from them."""
    digest = hashlib.sha256()
    for batch in batches:
        for array in batch.as_dict().values():
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]
