"""Giving freed heap memory back to the operating system between RL iterations.

An RL iteration allocates and frees tensors whose sizes change from one iteration to the
next (rollouts of different lengths, minibatches of different rows). glibc's allocator keeps
what was freed in its heap, and its dynamic mmap threshold moves large blocks there too
(after the first large free it rises up to 32 MiB), so the resident size sampled between
iterations drifts upward with the largest iteration seen, though nothing is held (measured:
`bench/soak.py`, BENCHMARKS.md "Soak"). `malloc_trim(0)` between iterations returns the free
pages. Its price is paid in the next iteration, which faults the pages in again: about 20 ms
a step on the text task's 0.2 s GRPO steps (BENCHMARKS.md "Releasing memory between
iterations"), nothing next to BabyAI's iterations of seconds. So the trainer releases only
when the resident size has grown by more than `RELEASE_GROWTH_BYTES` since the last release
(`MemoryReleaser`). Counted on 2026-12-08: the demo's BabyAI config (8 environments) released
after 19 of 20 iterations, as before; `configs/text/lora_new.yaml` after every step (its steps
leave more than the margin); the TRL benchmark's text set-up (8 completions a step) once in
40 steps, which is where the gain is. Between releases the resident size is within the margin
of the released level.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable

__all__ = ["RELEASE_GROWTH_BYTES", "MemoryReleaser", "release_free_memory", "resident_bytes"]

RELEASE_GROWTH_BYTES = 16 << 20  # resident growth since the last release that triggers the next


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


def resident_bytes() -> int | None:
    """The process's resident set size (Linux `/proc/self/statm`), or None where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class MemoryReleaser:
    """`release_free_memory` between iterations, when the resident size has grown by more than
    `growth_bytes` since the last release (or since the start).

    Args:
        growth_bytes: the margin (None: `RELEASE_GROWTH_BYTES`; 0: after every iteration).
        resident: the resident size in bytes, or None where unknown, which releases after
            every iteration (tests give their own).
    """

    def __init__(self, growth_bytes: int | None = None,
                 resident: Callable[[], int | None] = resident_bytes) -> None:
        self.growth_bytes = RELEASE_GROWTH_BYTES if growth_bytes is None else growth_bytes
        self.resident = resident
        self.level = resident()  # the resident size after the last release

    def after_iteration(self) -> bool:
        """Releases when the resident size is more than `growth_bytes` above the level after
        the last release (always with `growth_bytes` 0); True when it did."""
        now = self.resident()
        if self.growth_bytes > 0 and now is not None and self.level is not None \
                and now - self.level <= self.growth_bytes:
            return False
        release_free_memory()
        self.level = self.resident()
        return True
