"""Several processes, one actor: FSDP2 sharding (`shard_actor`) and DDP (`replicate_actor`).

Everything here runs on PyTorch's own engines (`torch.distributed.fsdp.fully_shard`,
`torch.nn.parallel.DistributedDataParallel`). The LoRA-specific rules:

- FSDP2 units are whole repeated blocks (decoder layers, ViT blocks) plus the root, never a
  `LoRALinear` or its `lora_A` / `lora_B` alone: the fused op reads `base_layer.weight` and
  `lora_A.weight` in one call, so they must be unsharded together. FSDP2 shards per
  parameter, so frozen base weights and trainable adapters may share a unit; only
  parameters with a gradient are reduce-scattered.
- DDP registers hooks only for parameters that require grad, so on a patched actor only the
  adapters are all-reduced; every adapter takes part in every training forward, so
  `find_unused_parameters` stays False.

Sharded parameters are read and written through `lora_runtime._dist` (full_tensor,
gathered, copy_full_); process groups are `parallel.process_group`'s.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from lora_runtime._dist import comm_device, is_sharded
from lora_runtime.adapters import iter_lora_layers, unwrap_model
from lora_runtime.parallel.blocks import find_blocks

__all__ = ["MODES", "replicate_actor", "shard_actor", "wrap_actor"]


# ----------------------------------------------------------------------------- FSDP2


def _default_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(comm_device().type, (dist.get_world_size(),))


def _check_shardable(model: nn.Module, who: str) -> None:
    if not dist.is_initialized():
        raise RuntimeError(
            f"{who}: no process group; call init_distributed() first (under torchrun)"
        )
    if model is not unwrap_model(model):
        raise ValueError(
            f"{who}: got a {type(model).__name__} wrapper; pass the plain model "
            "(compile after sharding)"
        )
    if is_sharded(model):
        raise ValueError(f"{who}: the model is already sharded with fully_shard")
    merged = [p for p, layer in iter_lora_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(f"{who}: layers are merged ({merged[:3]}); leave merged(...) first")


@torch.no_grad()
def _broadcast_states(model: nn.Module, group) -> None:
    """Copies the group's first rank's parameters and buffers to the other ranks."""
    src = dist.get_global_rank(group, 0)
    device = comm_device()
    for t in [*model.parameters(), *model.buffers()]:
        if t.device == device:
            dist.broadcast(t.detach(), src=src, group=group)  # in place
        else:  # e.g. a CPU model with nccl: go through the communication device
            buf = t.detach().to(device)
            dist.broadcast(buf, src=src, group=group)
            t.copy_(buf)


def shard_actor(
    model: nn.Module,
    mesh=None,
    reshard_after_forward: bool = True,
    block_types: Iterable[type | str] | None = None,
    sync_module_states: bool = True,
    own_units: Iterable[str] = (),
) -> nn.Module:
    """Applies FSDP2 (`fully_shard`) to each repeated block, then to the root, in place.

    First the mesh's first rank broadcasts its parameters and buffers (as DDP does at
    construction), so every rank shards the same weights even if they were built with
    different random draws. Each unit's parameters (frozen base weights and trainable adapters alike) are sharded
    on dim 0 across `mesh`; a unit is all-gathered before its forward (and again before its
    backward when `reshard_after_forward`), and only gradients that exist (the adapters',
    for a patched actor) are reduce-scattered. Parameters become `DTensor`s; optimizers
    built after this call step the shards.

    Args:
        model: a patched (LoRA) or full-mode actor, on the device of the process group's
            backend or on CPU (FSDP2 moves it to the mesh's device).
        mesh: a 1-D `DeviceMesh`; None means all ranks ("cpu" for gloo, "cuda" for nccl).
        reshard_after_forward: free gathered parameters after forward (less memory, one
            more all-gather per unit in backward). Applied to every unit, root included.
        block_types: see `find_blocks`; `()` shards the root alone.
        sync_module_states: broadcast the first rank's weights before sharding (one
            transfer of the whole model); False when every rank loaded identical weights.

    Returns:
        `model` (its class is swapped to an `FSDPModule` subclass, paths are unchanged).

    Raises:
        RuntimeError: no process group, or merged layers.
        ValueError: a wrapper instead of the model, an already sharded model, a block
            inside a LoRALinear, or no repeated block found (name them with `block_types`).
    """
    from torch.distributed.fsdp import fully_shard

    _check_shardable(model, "shard_actor")
    blocks = find_blocks(model, block_types)
    if not blocks and block_types is None:
        raise ValueError(
            f"shard_actor: no repeated block found in {type(model).__name__} (no "
            "_no_split_modules, no nn.ModuleList of same-class blocks); pass "
            "block_types=[YourBlock] or () to shard the root alone"
        )
    mesh = mesh if mesh is not None else _default_mesh()
    if sync_module_states:
        _broadcast_states(model, mesh.get_group())
    for _, block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for name in own_units:
        fully_shard(model.get_submodule(name), mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


# ----------------------------------------------------------------------------- DDP


def replicate_actor(
    model: nn.Module, sync_buffers: bool = False, bucket_cap_mb: float = 25.0
) -> nn.Module:
    """Wraps the actor in `DistributedDataParallel`; only trainable parameters are reduced.

    Rank 0's parameters and buffers are broadcast once at construction, so every replica
    starts identical. Per step, DDP all-reduces (averages) the gradients of parameters with
    `requires_grad`: the adapters of a patched actor, everything of a full-mode one.

    Args:
        model: the actor, on this rank's device.
        sync_buffers: re-broadcast rank 0's buffers before each forward; off by default
            because the actors' buffers (rotary frequencies, masks) are constants.
        bucket_cap_mb: DDP gradient bucket size.

    Returns:
        The `DistributedDataParallel` wrapper (`.module` is `model`; the checkpoint
        functions accept either).

    Raises:
        RuntimeError: no process group, or merged layers.
        ValueError: a wrapper instead of the model, a sharded model, or no trainable
            parameter.
    """
    from torch.nn.parallel import DistributedDataParallel

    _check_shardable(model, "replicate_actor")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "replicate_actor: the model has no parameter with requires_grad; nothing to all-reduce"
        )
    device = next(model.parameters()).device
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        forward_sync_buffers=sync_buffers,
        bucket_cap_mb=bucket_cap_mb,
        find_unused_parameters=False,
    )


MODES = ("none", "fsdp", "ddp")


def wrap_actor(model: nn.Module, mode: str, own_units: Iterable[str] = ()) -> nn.Module:
    """The actor as trained under `runner.distributed`: as is, sharded or replicated.

    Args:
        model: the prepared actor (patched or full), on this rank's device.
        mode: "none", "fsdp" (`shard_actor`) or "ddp" (`replicate_actor`).
        own_units: submodules called outside the model's forward (see `shard_actor`).

    Returns:
        `model` for "none" and "fsdp" (sharded in place), the DDP wrapper for "ddp".

    Raises:
        ValueError: an unknown mode; see `shard_actor` / `replicate_actor`.
    """
    if mode not in MODES:
        raise ValueError(f"runner.distributed={mode!r}; allowed {list(MODES)}")
    if mode == "fsdp":
        return shard_actor(model, own_units=own_units)
    if mode == "ddp":
        return replicate_actor(model)
    return model
