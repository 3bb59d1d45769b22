"""Calibration inputs for static int8: the (query, text) pairs whose activations set the fixed scales.

The sidecar ships a set of generic English pairs (``pairs.jsonl``, written by ``generate``);
``--calibration-file`` names a deployment's own, in the same format: one JSON object a line with
string fields ``query`` and ``text``. A file that cannot be read, holds no pairs, has a malformed line,
or whose pairs are all longer than the model's limit stops the start with one line naming the file
and the line. Each pair becomes one unpadded row (padding would enter the activation statistics), in
file order, thinned evenly to at most ``MAX_ROWS``, so calibration sees the same inputs on every start.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sidecar.errors import ModelLoadError
from sidecar.model.batch import EncodedPair, TokenBatch, batches_digest, collate
from sidecar.model.kinds import kind_of
from sidecar.model.loading import TextModel
from sidecar.model.tokenization import PairSpec

logger = logging.getLogger(__name__)

PACKAGED = "pairs.jsonl"
# Calibration runs the fp32 model over every row twice (SmoothQuant's statistics, then the ranges), the
# largest part of a cold start: a longer set is thinned evenly to about this many rows. Half the packaged
# pairs measured the same fidelity as all of them (benchmarks/RESULTS.md, "Static int8").
MAX_ROWS = 152
# Long enough that nothing is cut: a pair's full length is compared with the model's limit.
_UNCUT = 1 << 30


@dataclass(frozen=True)
class CalibrationPair:
    query: str
    text: str
    line: int


@dataclass(frozen=True)
class CalibrationSet:
    """Where the pairs came from, and the pairs."""

    source: str
    pairs: tuple[CalibrationPair, ...]


@dataclass(frozen=True)
class Calibration:
    """A model's calibration rows, one pair (or one text) per batch, and a digest of their tokens for
    the cache key of what is calibrated on them."""

    source: str
    rows: tuple[TokenBatch, ...]

    def digest(self) -> str:
        return batches_digest(self.rows)


def read_calibration(path: str) -> CalibrationSet:
    """The pairs of ``--calibration-file``, or the packaged set when ``path`` is empty."""
    if not path:
        text = resources.files(__name__).joinpath(PACKAGED).read_text(encoding="utf-8")
        return _parse(f"the packaged calibration set ({PACKAGED})", text)
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"--calibration-file {path}: cannot read it: {exc}") from exc
    return _parse(f"--calibration-file {path}", text)


def _parse(source: str, text: str) -> CalibrationSet:
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ModelLoadError(f"{source} line {number}: not JSON ({exc})") from exc
        fields = (record.get("query"), record.get("text")) if isinstance(record, dict) else (None, None)
        if not all(isinstance(value, str) and value.strip() for value in fields):
            raise ModelLoadError(
                f"{source} line {number}: expected an object with non-empty string fields "
                f'"query" and "text", as {{"query": "...", "text": "..."}}'
            )
        pairs.append(CalibrationPair(fields[0], fields[1], number))  # type: ignore[arg-type]
    if not pairs:
        raise ModelLoadError(f"{source} line 1: no pairs; write one JSON object a line with query and text")
    return CalibrationSet(source, tuple(pairs))


def model_calibration(model: TextModel, calibration: CalibrationSet) -> Calibration:
    """The model's rows for the pairs that fit its limit: (query, text) pairs for a cross-encoder, the
    queries and texts one by one for a bi-encoder."""
    spec = PairSpec(max_length=_UNCUT)
    kind = kind_of(model)
    rows: list[EncodedPair] = []
    longest: tuple[int, int] = (0, 0)
    for pair in calibration.pairs:
        encoded = kind.calibration_rows(model, pair.query, pair.text, spec)
        fitting = [row for row in encoded if len(row) <= model.max_length]
        rows.extend(fitting)
        if len(fitting) < len(encoded):
            longest = max(longest, (max(len(row) for row in encoded), pair.line))
    if not rows:
        tokens, line = longest
        raise ModelLoadError(
            f"{calibration.source} line {line}: every pair is longer than the model's limit of "
            f"{model.max_length} tokens (this one has {tokens}); calibrate with shorter pairs"
        )
    if longest != (0, 0):
        logger.info("calibration: left out the pairs longer than %d tokens", model.max_length)
    step = -(-len(rows) // MAX_ROWS)
    batches = tuple(collate([row], model.pad_token_id, model.uses_token_type_ids) for row in rows[::step])
    return Calibration(calibration.source, batches)
