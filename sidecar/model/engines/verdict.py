"""The remembered engine choice: what ``--engine auto`` / ``--precision auto`` chose for a model on this
hardware, so a restart loads and gates only that engine instead of loading, gating and timing every
candidate again.

One file per model and device under ``--cache-dir/verdicts``. Its key holds everything the choice
depends on (the model's content, the hardware, the engine libraries' versions, the probe and the
settings that shape the batches); a start whose key differs in any field selects again and logs which
fields changed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from sidecar.model.cache import write_json_atomically

logger = logging.getLogger(__name__)

_FORMAT = 1


@dataclass(frozen=True)
class Verdict:
    """A finished selection, as the next start needs it."""

    engine: str
    precision: str
    # Rows per second of each candidate timed ("engine/precision" -> rows/s); empty when none was timed.
    timings: dict[str, float]
    speedup_over_lossless: float
    notes: tuple[str, ...]
    # Torch fp32 on the probe: the parity gate's reference, so a warm start need not run it again.
    reference_scores: tuple[float, ...]

    @property
    def candidate(self) -> str:
        return f"{self.engine}/{self.precision}"


class VerdictStore:
    def __init__(self, root: Path) -> None:
        self.directory = root / "verdicts"

    def _path(self, model_hash: str, device: str) -> Path:
        return self.directory / f"{model_hash[:24]}-{device.replace(':', '_')}.json"

    def recall(self, model_hash: str, device: str, key: Mapping[str, str]) -> tuple[Verdict | None, str]:
        """The verdict remembered for exactly this key, or None and why there is none."""
        path = self._path(model_hash, device)
        if not path.is_file():
            return None, "no choice is remembered for this model and device"
        try:
            record = json.loads(path.read_text())
            if record.get("format") != _FORMAT:
                return None, f"{path} is in an older format"
            remembered = record["key"]
            verdict = record["verdict"]
            verdict = Verdict(
                engine=verdict["engine"],
                precision=verdict["precision"],
                timings={str(name): float(speed) for name, speed in verdict["timings"].items()},
                speedup_over_lossless=float(verdict["speedup_over_lossless"]),
                notes=tuple(verdict["notes"]),
                reference_scores=tuple(float(score) for score in verdict["reference_scores"]),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return None, f"{path} is unreadable ({type(exc).__name__}: {exc})"
        changed = sorted(name for name in {*key, *remembered} if key.get(name) != remembered.get(name))
        if changed:
            described = "; ".join(f"{name} {remembered.get(name)!r} -> {key.get(name)!r}" for name in changed)
            return None, f"the remembered choice was made for other conditions: {described}"
        return verdict, ""

    def remember(self, model_hash: str, device: str, key: Mapping[str, str], verdict: Verdict) -> None:
        """Write the verdict atomically; a cache that cannot be written costs only the next start's time."""
        path = self._path(model_hash, device)
        record = {"format": _FORMAT, "key": dict(key), "verdict": asdict(verdict)}
        try:
            write_json_atomically(path, record)
        except OSError as exc:
            logger.warning("could not remember the engine choice in %s: %s", path, exc)
