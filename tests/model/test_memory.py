"""The heap trimmer hands freed memory back while requests come, and stays still while idle."""

from __future__ import annotations

import subprocess
import sys
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


_LARGE_BLOCKS_FREED = """
import sys
from sidecar.model.memory import fix_mmap_threshold

def rss_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024

fixed = fix_mmap_threshold(1 << 20) if sys.argv[1] == "fixed" else True
first = bytearray(8 << 20)  # a larger block freed first: by default glibc's threshold rises past it
del first
large, small = [], []
for _ in range(40):  # as an engine's scratch buffers, with a request's small objects between them
    block = bytearray(4 << 20)
    block[::4096] = b"x" * len(block[::4096])
    large.append(block)
    small.append(bytearray(1024))
before = rss_mb()
large.clear()
print(fixed, before - rss_mb())
"""


def returned_mb(threshold: str) -> float:
    """MB given back by freeing 160 MB of large blocks, in a fresh interpreter."""
    fixed, returned = subprocess.check_output(
        [sys.executable, "-c", _LARGE_BLOCKS_FREED, threshold], text=True
    ).split()
    assert fixed == "True"
    return float(returned)


def test_with_the_mmap_threshold_fixed_large_blocks_go_back_when_freed():
    assert returned_mb("fixed") > 150
    # By default glibc serves them from the heap once a larger block was freed, and the small
    # allocations between them keep the freed pages resident until a trim.
    assert returned_mb("default") < 50
