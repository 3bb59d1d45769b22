"""The heap trimmer hands freed memory back while requests come, and stays still while idle."""

from __future__ import annotations

import time
from collections.abc import Callable

from sidecar.model.memory import HeapTrimmer

INTERVAL_S = 0.05


class CountingTrim:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, pad: int) -> int:
        self.calls.append(pad)
        return 1


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_it_never_trims_while_idle():
    trim = CountingTrim()
    trimmer = HeapTrimmer(INTERVAL_S, trim)
    trimmer.start()
    time.sleep(INTERVAL_S * 6)
    trimmer.stop()
    assert trim.calls == []


def test_the_batches_of_a_busy_moment_make_one_trim_after_the_interval():
    trim = CountingTrim()
    trimmer = HeapTrimmer(INTERVAL_S, trim)
    trimmer.start()
    for _ in range(5):
        trimmer.note_work()
    wait_until(lambda: len(trim.calls) == 1)
    time.sleep(INTERVAL_S * 6)  # idle again: nothing more
    assert trim.calls == [0]
    trimmer.note_work()
    wait_until(lambda: len(trim.calls) == 2)
    trimmer.stop()


def test_an_interval_of_zero_turns_it_off():
    trim = CountingTrim()
    trimmer = HeapTrimmer(0, trim)
    trimmer.start()
    trimmer.note_work()
    time.sleep(INTERVAL_S * 4)
    trimmer.stop()
    assert trim.calls == []


def test_stop_returns_while_work_is_pending():
    trimmer = HeapTrimmer(60.0, CountingTrim())
    trimmer.start()
    trimmer.note_work()
    started = time.monotonic()
    trimmer.stop()
    assert time.monotonic() - started < 30  # not the 60 s interval
