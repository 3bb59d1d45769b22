"""Handing back to the operating system what loading left behind.

A cold start holds the fp32 reference network, the candidates that lost, export buffers and the
parser state of several libraries; once they are unreferenced, the collector frees the cycles among
them, and glibc's ``malloc_trim`` returns the freed heap pages, which glibc otherwise keeps mapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None under another C library."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_unused_memory() -> None:
    """Collect unreferenced objects and return free heap pages to the operating system."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
