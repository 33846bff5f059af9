"""One layer of `merged(...)`: merging it in place and keeping what restores it bit-exactly.

Per layer the smaller exact store is kept (see `adapters/merge.py`): a patch (a bitmask of
the elements where `round(M - delta)` misses W, and their original values) or a plain copy
of W. On CPU with the extension loaded both directions are one fused C++ op each
(`ops.merge_exact`: one pass over the weight each way, the product `B @ A` computed in
cache-sized tiles inside it); elsewhere (GPU, no extension) the same
arithmetic runs as tensor ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from lora_runtime._dist import full_tensor, local_rows
from lora_runtime.adapters.layer import LoRALinear, accumulation_dtype
from lora_runtime.adapters.merge_bits import bits, checksum, pack, unpack
from lora_runtime.ops.merge_exact import (
    MergeStore,
    fused_merge_applies,
    lora_product,
    merge_enter,
    merge_leave,
)

__all__ = ["LayerRestore", "add_delta", "merge_layer", "nbytes", "restore_layer"]


def add_delta(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """`round_to_W_dtype(weight + delta)`, the sum in `accumulation_dtype(weight.dtype)`; a new tensor.

    `delta` (float32 `[out, in]`) is used as the accumulator and overwritten.
    """
    acc = delta.to(accumulation_dtype(weight.dtype))  # [out, in]
    return acc.add_(weight).to(weight.dtype)


def sub_delta(merged_w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """`round_to_W_dtype(merged_w - delta)`: the restore's first guess of W; a new tensor."""
    acc = merged_w.to(accumulation_dtype(merged_w.dtype), copy=True)  # [out, in]
    return acc.sub_(delta).to(merged_w.dtype)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class LayerRestore:
    """One merged layer: what the exact restore needs (a patch, or a plain copy of W)."""

    path: str
    layer: LoRALinear
    store: MergeStore  # mask + values, or a copy of W; and W's checksum
    lora_a: torch.Tensor  # [r, in], snapshot at entry
    lora_b: torch.Tensor  # [out, r], snapshot at entry
    weight_version: int | None  # W._version after merging; None for an FSDP2 shard, whose
    # storage FSDP2 rewrites around forwards (the bit-exact checksum still guards it)
    adapter_versions: tuple[int, int]

    @property
    def values(self) -> torch.Tensor:
        return self.store.values

    @property
    def nbytes(self) -> int:
        held = [self.store.values, self.lora_a, self.lora_b]
        held += [t for t in (self.store.mask, self.store.copy) if t is not None]
        return sum(nbytes(t) for t in held)


def _local_weight_and_factors(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's base weight rows (all, unsharded; an FSDP2 shard's, sharing its storage),
    `B[rows]` and `A` (gathered, contiguous) in the accumulation dtype: the delta is
    `B[rows] @ A` times `layer.scaling` (as `get_delta_weight`)."""
    weight, rows = local_rows(layer.base_layer.weight.detach())  # [rows, in]
    a = full_tensor(layer.lora_A.weight.detach()).to(accumulation_dtype(weight.dtype))  # [r, in]
    b = full_tensor(layer.lora_B.weight.detach())[rows].to(a.dtype)  # [rows, r]
    return weight, b.contiguous(), a.contiguous()


def _enter_with_tensor_ops(w: torch.Tensor, delta: torch.Tensor) -> MergeStore:
    """`merge_enter`'s result and effect, as tensor ops (any device)."""
    merged_w = add_delta(w, delta.clone())  # [rows, in], W's dtype
    patch = bits(sub_delta(merged_w, delta)) != bits(w)  # [rows, in] bool: the restore misses
    n_patched = int(patch.sum())
    patch_bytes = (n_patched * w.element_size() + (w.numel() + 7) // 8) if n_patched else 0
    use_copy = patch_bytes >= nbytes(w)
    store = MergeStore(
        mask=pack(patch) if n_patched and not use_copy else None,
        values=w.masked_select(patch) if not use_copy else w.new_empty(0),  # [n_patched]
        copy=w.clone() if use_copy else None,
        checksum=0 if use_copy else checksum(w),
    )
    w.copy_(merged_w)
    return store


def merge_layer(path: str, layer: LoRALinear) -> LayerRestore:
    """Merges one layer in place and returns what restores it bit-exactly (the smaller store)."""
    a, b = layer.lora_A.weight, layer.lora_B.weight
    versions = (a._version, b._version)
    lora_a, lora_b = a.detach().clone(), b.detach().clone()
    w, b, a = _local_weight_and_factors(layer)  # [rows, in], [rows, r], [r, in]
    # `w` shares the base weight's storage (and version counter)
    if fused_merge_applies(w, b, a):
        store = merge_enter(w, b, a, layer.scaling)
    else:
        store = _enter_with_tensor_ops(w, lora_product(b, a) * layer.scaling)
    layer.merged = True
    return LayerRestore(
        path=path,
        layer=layer,
        store=store,
        lora_a=lora_a,
        lora_b=lora_b,
        weight_version=None if isinstance(layer.base_layer.weight, DTensor) else w._version,
        adapter_versions=versions,
    )


def restore_layer(item: LayerRestore) -> list[str]:
    """Puts the original weight back; returns the problems found (empty when all is well)."""
    layer, store, problems = item.layer, item.store, []
    a, b = layer.lora_A.weight, layer.lora_B.weight
    if (a._version, b._version) != item.adapter_versions:
        a.copy_(item.lora_a)
        b.copy_(item.lora_b)
        problems.append(f"'{item.path}' adapters (restored to their values at entry)")
    weight = local_rows(layer.base_layer.weight.detach())[0]  # [rows, in]
    if item.weight_version is not None and weight._version != item.weight_version:
        how = "undone: restored from its copy" if store.copy is not None else "it cannot be restored exactly"
        problems.append(f"'{item.path}.base_layer.weight' ({how})")
    layer.merged = False
    if store.copy is not None:
        weight.copy_(store.copy)  # a copy is exact as is
        return problems
    weight, b, a = _local_weight_and_factors(layer)  # [rows, in], [rows, r], [r, in]
    if fused_merge_applies(weight, b, a):
        restored_sum = merge_leave(weight, b, a, layer.scaling, store)
    else:
        original = sub_delta(weight, lora_product(b, a) * layer.scaling)  # [rows, in]
        if store.mask is not None:
            original.masked_scatter_(unpack(store.mask, original.shape), store.values)
        weight.copy_(original)
        restored_sum = checksum(weight)
    if restored_sum != store.checksum and not problems:
        problems.append(f"'{item.path}.base_layer.weight' failed the bit-exact check")
    return problems
