"""Stopping a run cleanly and running it on a chosen number of threads.

Ctrl-C (SIGINT) and SIGTERM (what schedulers and `torchrun` send) ask the run to stop after
the current step. Under torchrun the ranks agree at every step boundary (`Interrupt.agreed`,
one tiny all-reduce), so every rank finishes the same step, saves once and stops, even when
the signal reached only some of them.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.distributed as dist

from lora_runtime import parallel
from lora_runtime._dist import comm_device
from lora_runtime._threads import num_threads

__all__ = ["Interrupt", "catch_signals", "num_threads"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupt:
    """Records the first stop signal; the loop stops after the step it arrived in.

    Args:
        abort_on_repeat: a second SIGINT raises KeyboardInterrupt (an impatient user in a
            single process). Under torchrun it is False: torchrun sends the signal it got
            on to its workers, so a rank may see Ctrl-C twice for one key press.
    """

    def __init__(self, abort_on_repeat: bool = True) -> None:
        self.signal: str | None = None  # "SIGINT" or "SIGTERM"
        self.abort_on_repeat = abort_on_repeat

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def handler(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            if self.abort_on_repeat and signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signal = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (a collective under torchrun); a rank that got
        no signal takes on the one the others got (SIGTERM when some got each)."""
        if parallel.get_world_size() == 1:
            return self.requested
        code = torch.tensor([0 if self.signal is None else int(signal.Signals[self.signal])], dtype=torch.int64)
        code = code.to(comm_device())
        dist.all_reduce(code, op=dist.ReduceOp.MAX)  # SIGTERM (15) wins over SIGINT (2)
        value = int(code.item())
        if value and self.signal is None:
            self.signal = signal.Signals(value).name
        return bool(value)


@contextmanager
def catch_signals(flag: Interrupt) -> Iterator[None]:
    """Routes SIGINT and SIGTERM to `flag.handler` inside the block (main thread only);
    the previous handlers are restored on exit."""
    with ExitStack() as stack:
        for sig in STOP_SIGNALS:
            try:
                previous = signal.signal(sig, flag.handler)
            except ValueError:  # not the main thread: leave signals alone
                break
            stack.callback(signal.signal, sig, previous)
        yield

