"""Stopping a run cleanly and running it on a chosen number of threads."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["Interrupt", "catch_sigint", "num_threads"]


class Interrupt:
    """First Ctrl-C asks the loop to stop after the current step; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False

    def handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@contextmanager
def catch_sigint(flag: Interrupt) -> Iterator[None]:
    """Routes SIGINT to `flag.handler` inside the block (main thread only)."""
    try:
        previous = signal.signal(signal.SIGINT, flag.handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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
