"""Counts the bytes each collective moves, to measure communication per training step.

`CommCounter` is a `TorchDispatchMode`: every `c10d` collective dispatched while it is
active (FSDP2's all-gathers and reduce-scatters, DDP's bucket all-reduces, broadcasts) is
recorded as `(kind, bytes)`. Bytes are the size of the whole logical buffer of the
collective on one rank: the gathered output of an all-gather, the unreduced input of a
reduce-scatter, the tensor of an all-reduce or broadcast. (On the wire, a ring moves about
`(world - 1) / world` of that per rank for all-gather and reduce-scatter, twice that for
all-reduce.)
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CommCounter"]

_c10d = torch.ops.c10d
_fn = torch.ops._c10d_functional  # what DTensor (full_tensor, redistribute) dispatches


def _nbytes(arg) -> int:
    if isinstance(arg, torch.Tensor):
        return arg.numel() * arg.element_size()
    if isinstance(arg, (list, tuple)):
        return sum(_nbytes(a) for a in arg)
    return 0


def _arg(i: int):
    return lambda args: _nbytes(args[i])


def _gathered(args) -> int:  # functional all-gather: input bytes x group_size
    return _nbytes(args[0]) * args[1]


# op -> (kind, bytes of the whole logical buffer from the op's arguments)
_OPS = {
    _c10d.allreduce_.default: ("all_reduce", _arg(0)),
    _c10d.allreduce_coalesced_.default: ("all_reduce", _arg(0)),
    _c10d.broadcast_.default: ("broadcast", _arg(0)),
    _c10d._allgather_base_.default: ("all_gather", _arg(0)),
    _c10d.allgather_.default: ("all_gather", _arg(0)),
    _c10d.allgather_into_tensor_coalesced_.default: ("all_gather", _arg(0)),
    _c10d._reduce_scatter_base_.default: ("reduce_scatter", _arg(1)),
    _c10d.reduce_scatter_.default: ("reduce_scatter", _arg(1)),
    _c10d.reduce_scatter_tensor_coalesced_.default: ("reduce_scatter", _arg(1)),
    _fn.all_reduce.default: ("all_reduce", _arg(0)),
    _fn.all_reduce_.default: ("all_reduce", _arg(0)),
    _fn.all_reduce_coalesced.default: ("all_reduce", _arg(0)),
    _fn.broadcast.default: ("broadcast", _arg(0)),
    _fn.all_gather_into_tensor.default: ("all_gather", _gathered),
    _fn.all_gather_into_tensor_out.default: ("all_gather", _gathered),
    _fn.all_gather_into_tensor_coalesced.default: ("all_gather", _gathered),
    _fn.reduce_scatter_tensor.default: ("reduce_scatter", _arg(0)),
    _fn.reduce_scatter_tensor_coalesced.default: ("reduce_scatter", _arg(0)),
}


class CommCounter(TorchDispatchMode):
    """Records collectives while active: `with CommCounter() as comm: step()`.

    Attributes:
        records: `(kind, bytes)` per collective call, in order; kind is "all_reduce",
            "all_gather", "reduce_scatter" or "broadcast".
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        entry = _OPS.get(func)
        if entry is not None:
            kind, size = entry
            self.records.append((kind, size(args)))
        return func(*args, **(kwargs or {}))

    def bytes_by_kind(self) -> dict[str, int]:
        """Total bytes per kind of collective."""
        totals: Counter[str] = Counter()
        for kind, n in self.records:
            totals[kind] += n
        return dict(totals)

    def calls_by_kind(self) -> dict[str, int]:
        """Number of collective calls per kind."""
        return dict(Counter(kind for kind, _ in self.records))
