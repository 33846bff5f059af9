"""Seeds and thread counts: every test runs with its own seeds and leaves the global RNG
state and the thread count as it found them (the suite runs in random order, see TESTING.md)."""

from __future__ import annotations

import contextlib
import random
import zlib

import numpy as np
import torch


def seed_of(nodeid: str) -> int:
    """A test's own seed: fixed by its id, so it does not depend on which tests ran before."""
    return zlib.crc32(nodeid.encode())


def seed_everything(seed: int) -> None:
    """Seeds torch (CPU and CUDA), numpy and `random`."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextlib.contextmanager
def isolated(seed: int = 0, threads: int | None = 1):
    """Runs the block with its own seeds and thread count, and puts the global torch /
    numpy / `random` state and the thread count back afterwards. For module-scoped
    fixtures, which run before (and outside) the per-test isolation of conftest.py."""
    previous = torch.get_num_threads()
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            seed_everything(seed)
            if threads is not None:
                torch.set_num_threads(threads)
            yield
        finally:
            torch.set_num_threads(previous)
            np.random.set_state(np_state)
            random.setstate(py_state)
