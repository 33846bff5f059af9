"""Process groups: join torchrun's group, choose the device, split batches, reduce metrics.

Every function works without a process group too (rank 0 of 1), so single-process code
calls them unconditionally.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from lora_runtime._dist import barrier, comm_device, get_rank, get_world_size, is_main_process

__all__ = [
    "DistContext",
    "init_distributed",
    "main_process_first",
    "rank_slice",
    "reduce_metrics",
    "resolve_device",
    "share_size",
    "shutdown_distributed",
]

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_REDUCE_OPS = {
    "mean": dist.ReduceOp.SUM,
    "sum": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}

# ----------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: `rank` of `world_size`, its `device` and the backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> DistContext:
    """Joins the process group described by torchrun's environment variables.

    Args:
        backend: "gloo" or "nccl"; None picks "nccl" when CUDA is available, else "gloo".
        timeout_s: how long a collective may wait for the other ranks before it fails
            (a rank that died makes the others fail after at most this long, even without
            torchrun stopping them first).

    Returns:
        The `DistContext`; with CUDA, the current device is set to `LOCAL_RANK`.

    Raises:
        RuntimeError: the launch variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
            MASTER_PORT) are missing: the process was not started by torchrun.
        ValueError: an unknown backend or a non-positive timeout.
    """
    if backend is not None and backend not in ("gloo", "nccl"):
        raise ValueError(f"init_distributed: backend={backend!r}; allowed 'gloo', 'nccl' or None")
    if not timeout_s > 0:
        raise ValueError(f"init_distributed: timeout_s={timeout_s!r}; must be > 0")
    if not dist.is_initialized():
        missing = [v for v in _LAUNCH_VARS if v not in os.environ]
        if missing:
            raise RuntimeError(
                f"init_distributed: environment variables {missing} are not set; start the run "
                "with `torchrun --nproc_per_node N ...` (or set all of "
                f"{list(_LAUNCH_VARS)})"
            )
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    backend = dist.get_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def shutdown_distributed() -> None:
    """Leaves the process group (no-op when there is none).

    Unreachable objects are collected first, while the group still lives: a DDP wrapper's
    reducer holds the group, and freed after `destroy_process_group` it would drop the group's
    last reference while holding the GIL; gloo's destructor then joins worker threads that may
    need the GIL to free a finished collective's tensors, and the process hangs at exit (seen
    on a loaded machine with a 2-rank DDP run). Callers hand back the wrapped module, not the
    wrapper, for the same reason.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def resolve_device(name: str, key: str = "device") -> torch.device:
    """A device name as users write it -> a torch device ("auto": cuda when available).

    Args:
        name: "auto", "cpu", "cuda" or "cuda:N".
        key: how the message names the setting (e.g. "runner.device", "--device").

    Raises:
        ValueError: an unknown name, or cuda where torch sees no CUDA device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{key}={name!r}: expected cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{key}={name!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{key}={name!r} but torch {torch.__version__} sees no CUDA device here; use 'cpu' or 'auto'"
        )
    return device


# ----------------------------------------------------------------------------- batches, metrics


def rank_slice(total: int, rank: int | None = None, world_size: int | None = None) -> slice:
    """This rank's contiguous share of `total` items (rank r gets `[r*n, (r+1)*n)`).

    Raises:
        ValueError: `total` is not a positive multiple of the world size.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if total < 1 or total % world_size:
        raise ValueError(
            f"rank_slice: {total} items cannot be split evenly over world_size={world_size}; "
            "use a batch size that is a positive multiple of the number of processes"
        )
    n = total // world_size
    return slice(rank * n, (rank + 1) * n)


def share_size(total: int) -> int:
    """How many of `total` items this rank takes (`total / world_size`; see `rank_slice`)."""
    share = rank_slice(total)
    return share.stop - share.start


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds and caches a base model), then the others.

    If rank 0 raises inside, the others wait until torchrun stops them or the process
    group's timeout ends the wait.
    """
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def reduce_metrics(metrics: Mapping[str, float], op: str = "mean") -> dict[str, float]:
    """Reduces scalar metrics over ranks in one all-reduce (float64).

    Every rank must pass the same keys. Without a process group the values come back as
    floats, unchanged.

    Args:
        metrics: `{name: scalar}` (Python numbers or 0-d tensors).
        op: "mean", "sum", "max" or "min".

    Raises:
        ValueError: an unknown op.
    """
    if op not in _REDUCE_OPS:
        raise ValueError(f"reduce_metrics: op={op!r}; allowed {sorted(_REDUCE_OPS)}")
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)  # [K]
    world = get_world_size()
    if world > 1 and keys:
        values = values.to(comm_device())
        dist.all_reduce(values, op=_REDUCE_OPS[op])
        if op == "mean":
            values = values / world
    return dict(zip(keys, values.cpu().tolist()))
