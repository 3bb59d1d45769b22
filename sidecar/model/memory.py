"""Handing back to the operating system what loading, and then serving, left behind.

A cold start holds the fp32 reference network, the candidates that lost, export buffers and the
parser state of several libraries; once they are unreferenced, the collector frees the cycles among
them, and glibc's ``malloc_trim`` returns the freed heap pages, which glibc otherwise keeps mapped.
Serving leaves the same behind on a smaller scale (request bodies, decoded texts, batch tensors, in
several threads' arenas), which ``HeapTrimmer`` hands back while requests come.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys
import threading
from collections.abc import Callable

# mallopt's parameter number for the mmap threshold, in glibc's malloc.h.
_M_MMAP_THRESHOLD = -3


@functools.cache
def _libc_function(name: str, *argtypes: type) -> Callable[..., int] | None:
    """glibc's function ``name``, or None under another C library."""
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    function = getattr(ctypes.CDLL(library), name, None)
    if function is None:
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None under another C library."""
    return _libc_function("malloc_trim", ctypes.c_size_t)


def fix_mmap_threshold(threshold: int) -> bool:
    """Serve allocations of ``threshold`` bytes or more from their own memory maps, which go back to
    the system when freed, and stop glibc from raising that threshold. By default glibc raises it to the
    size of each large block freed (up to 32 MB), after which an engine's scratch buffers come from the
    heap, where the small allocations of the requests served meanwhile keep pages of them resident
    after they are freed (benchmarks/RESULTS.md, "Start-up to SERVING and memory"). Whether it was set:
    False under another C library."""
    mallopt = _libc_function("mallopt", ctypes.c_int, ctypes.c_int)
    return mallopt is not None and mallopt(_M_MMAP_THRESHOLD, threshold) == 1


def release_unused_memory() -> None:
    """Collect unreferenced objects and return free heap pages to the operating system, and on a GPU
    the device memory that torch's allocator keeps cached (the losing candidates' weights)."""
    gc.collect()
    torch = sys.modules.get("torch")  # never imported for this: a warm start runs without torch
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class HeapTrimmer:
    """Returns freed heap pages to the operating system while requests are served: ``interval_s`` after
    work was noted, at most once per ``interval_s``, and never while idle. Without it, glibc keeps the
    pages of a large request's freed allocations mapped, and resident memory ratchets up to the largest
    requests seen (benchmarks/RESULTS.md, "Memory after huge documents")."""

    def __init__(self, interval_s: float, trim: Callable[[int], int] | None = None) -> None:
        self._interval_s = interval_s
        self._trim = trim or _malloc_trim()  # None under another C library
        self._worked = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start trimming; nothing happens with an interval of 0 or under another C library."""
        if self._interval_s > 0 and self._trim is not None:
            self._thread = threading.Thread(
                target=self._run, args=(self._trim,), name="heap-trim", daemon=True
            )
            self._thread.start()

    def note_work(self) -> None:
        """Some work ended (a batch): memory may have been freed. Safe from any thread."""
        self._worked.set()

    def stop(self) -> None:
        self._stopped.set()
        self._worked.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self, trim: Callable[[int], int]) -> None:
        while True:
            self._worked.wait()
            # The interval lets the request that did the work finish and release its memory, and
            # coalesces the batches of a busy period into one trim.
            if self._stopped.wait(self._interval_s):
                return
            self._worked.clear()
            trim(0)
