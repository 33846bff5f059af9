"""Several processes, one actor: process groups, FSDP2 / DDP wrapping, FSDP2 unit choice,
and a counter of the bytes each collective moves.

The rank and sharded-tensor helpers the adapters themselves need live one layer down in
`lora_runtime._dist` and are re-exported here for convenience.
"""

from lora_runtime._dist import (
    barrier,
    copy_full_,
    full_tensor,
    gathered,
    get_rank,
    get_world_size,
    is_main_process,
    is_sharded,
    reshard,
)
from lora_runtime.parallel.blocks import find_blocks
from lora_runtime.parallel.process_group import (
    DistContext,
    init_distributed,
    main_process_first,
    rank_slice,
    reduce_metrics,
    resolve_device,
    share_size,
    shutdown_distributed,
)
from lora_runtime.parallel.wrap import MODES, replicate_actor, shard_actor, wrap_actor

__all__ = [
    "MODES",
    "DistContext",
    "barrier",
    "copy_full_",
    "find_blocks",
    "full_tensor",
    "gathered",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "is_sharded",
    "main_process_first",
    "rank_slice",
    "reduce_metrics",
    "replicate_actor",
    "reshard",
    "resolve_device",
    "shard_actor",
    "share_size",
    "shutdown_distributed",
    "wrap_actor",
]
