"""Seconds spent in each phase of loading a model, for the one line logged when it serves."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

# The order the phases are reported in, whichever ran.
PHASES = ("load", "export", "build", "gate", "timing", "compile", "warm-up")


class PhaseTimer:
    """Accumulates wall seconds per phase; a phase timed inside another is not counted twice."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._nested: list[float] = []

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            nested = self._nested.pop()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed - nested
            if self._nested:
                self._nested[-1] += elapsed

    def add(self, seconds: Mapping[str, float]) -> None:
        """Count phases timed elsewhere (another process's) as this timer's own."""
        for phase, elapsed in seconds.items():
            self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed

    def describe(self) -> str:
        order = [*PHASES, *sorted(set(self.seconds) - set(PHASES))]
        parts = [f"{phase} {self.seconds[phase]:.1f} s" for phase in order if phase in self.seconds]
        return ", ".join(parts) or "nothing timed"
