"""The thread count of torch's CPU kernels, set for a block and put back afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["num_threads"]


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """`torch.set_num_threads(n)` inside the block (None: unchanged); restored on exit."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
