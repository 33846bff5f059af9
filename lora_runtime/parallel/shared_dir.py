"""Folders written by every rank and swapped in atomically by rank 0.

`lora_runtime._fs.atomic_dir` on rank 0, with its staging path handed to the other ranks:
every rank writes its part into the staging folder (e.g. `torch.distributed.checkpoint.save`,
a collective that returns once every rank's files are written), then rank 0 fsyncs the
folder and swaps it in. A rank that fails or is killed before the swap leaves the previous
folder in place; rank 0 removes the staging folder when the write raises there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch.distributed as dist

from lora_runtime._dist import barrier, get_world_size, is_main_process
from lora_runtime._fs import atomic_dir

__all__ = ["shared_atomic_dirs"]


@contextmanager
def shared_atomic_dirs(*targets: str) -> Iterator[list[str]]:
    """Yields one staging folder per target, the same paths on every rank; on success each
    replaces its target, one right after the other on rank 0.

    A collective: every rank enters and leaves it together. When the block raises on any
    rank, the collective inside it (the checkpoint save) raises on every rank, and rank 0
    removes the staging folders; the targets keep their previous content. Rank 0 swaps the
    folders in without waiting for any other rank in between, so a rank that dies can
    leave them only all old or all new.

    Yields:
        The staging folders' paths (absolute), identical on every rank.
    """
    with ExitStack() as stack:
        staging = [stack.enter_context(atomic_dir(t)) if is_main_process() else None for t in targets]
        if get_world_size() > 1:
            dist.broadcast_object_list(staging, src=0)
        yield staging
    barrier()  # the other ranks go on once rank 0 has swapped the folders in
