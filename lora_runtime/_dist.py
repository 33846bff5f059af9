"""Rank and sharded-tensor helpers: the little of torch.distributed the adapters need.

Every function works without a process group (rank 0 of 1) and on unsharded tensors, so
single-process code calls them unconditionally. Functions that gather (`full_tensor`,
`gathered`) are collectives for sharded (FSDP2 `DTensor`) parameters: every rank must call
them, in the same order. Setting up process groups and wrapping models is `parallel/`'s job.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = [
    "barrier",
    "comm_device",
    "copy_full_",
    "full_tensor",
    "gathered",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "is_sharded",
    "local_rows",
    "reshard",
]


def get_rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes, 1 without a process group."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 and in single-process runs: the one process that writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Waits for every rank (no-op without a process group or with one process)."""
    if get_world_size() > 1:
        dist.barrier()


def comm_device() -> torch.device:
    """The device collectives run on: the current CUDA device with nccl, else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_sharded(model: nn.Module) -> bool:
    """True when `fully_shard` was applied to `model` or one of its submodules."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathers a `DTensor` (an FSDP2 shard), returns anything else as is.

    A collective for a DTensor: every rank of its mesh must call it, in the same order.
    """
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """This rank's part of `t` (a plain tensor sharing its storage) and the rows (dim 0) of
    the whole tensor it holds: an FSDP2 shard's, or all of a plain tensor. No communication.

    Raises:
        ValueError: a DTensor sharded other than on dim 0 (FSDP2 shards dim 0 only).
    """
    if not isinstance(t, DTensor):
        return t, slice(0, t.shape[0])
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if any(offset[1:]) or tuple(shape[1:]) != tuple(t.shape[1:]):
        raise ValueError(f"local_rows: a DTensor with placements {t.placements} is not sharded on dim 0 alone")
    return t.to_local(), slice(offset[0], offset[0] + shape[0])


def reshard(model: nn.Module) -> None:
    """Frees gathered FSDP2 parameters so the registered ones are the shards again.

    Needed before writing parameters in place when `reshard_after_forward=False` left
    gathered copies registered after a forward; a no-op for unsharded models.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@contextmanager
def gathered(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily registers whole copies of `module`'s sharded (DTensor) parameters.

    Inside the block, code that reads `module`'s parameters directly (e.g. a merge of one
    `LoRALinear`) sees ordinary full tensors; the shards are put back on exit. Gathers one
    tensor at a time, so at most `module`'s parameters are whole at once. A collective for
    sharded modules (every rank must enter it, in the same order); a no-op otherwise.
    Do not run forward or backward of the sharded model inside it.

    Yields:
        `module`.
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if isinstance(param, DTensor):
                    full = param.detach().full_tensor()
                    swapped.append((sub, name, param))
                    sub._parameters[name] = nn.Parameter(full, requires_grad=False)
        yield module
    finally:
        for sub, name, param in reversed(swapped):
            sub._parameters[name] = param


@torch.no_grad()
def copy_full_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`dst.copy_(src)` where `src` is the whole tensor and `dst` may be a DTensor shard.

    Each rank keeps its own slice of `src` (same chunking as `distribute_tensor`); no
    communication, so every rank must hold the same `src`.

    Raises:
        ValueError: `src` does not have `dst`'s global shape.
    """
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(
            f"copy_full_: source shape {list(src.shape)} != parameter shape {list(dst.shape)}"
        )
    if isinstance(dst, DTensor):
        src = src.to(device=dst.to_local().device, dtype=dst.dtype)
        shard = distribute_tensor(src, dst.device_mesh, dst.placements, src_data_rank=None)
        dst.to_local().copy_(shard.to_local())
    else:
        dst.copy_(src)
