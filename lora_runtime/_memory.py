"""Giving freed heap memory back to the operating system between RL iterations.

An RL iteration allocates and frees tensors whose sizes change from one iteration to the
next (rollouts of different lengths, minibatches of different rows). glibc's allocator keeps
what was freed in its heap, and its dynamic mmap threshold moves large blocks there too
(after the first large free it rises up to 32 MiB), so the resident size sampled between
iterations drifts upward with the largest iteration seen, though nothing is held (measured:
`bench/soak.py`, BENCHMARKS.md "Soak"). `malloc_trim(0)` after each iteration returns the free
pages; it costs a few milliseconds against iterations of seconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["release_free_memory"]


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None (another C library, or none found)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Returns the allocator's free pages to the OS (glibc); False where there is no `malloc_trim`."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
