"""The exact, reversible merge of one weight in one pass each way (`csrc/merge_exact.cpp`).

`merge_enter(weight, lora_b, lora_a, scaling)` writes `round(W + scaling * P)` into `weight`,
`P = lora_b @ lora_a`, and returns what gives W back bit for bit: a packed mask and the
original values of the elements where `round(M - scaling * P)` misses W, or a plain copy of W
when that patch would not be smaller. `merge_leave` undoes it. The factors come in the
accumulation dtype (float32; float64 for a float64 weight); the kernels compute P a tile of
rows at a time and use each tile from the cache, so the product is never written whole. Both
run on contiguous CPU tensors with the extension loaded (`fused_merge_applies`); callers fall
back to tensor ops otherwise.

`lora_product(lora_b, lora_a)` is that product as a tensor: on CPU with the extension, the
kernels' own loop (`csrc/lora_product.h`: the terms summed in order of the rank, no FMA), so
`get_delta_weight`, `merge_lora` and the tensor-op merge give the merged weights of the fused
kernels bit for bit whatever BLAS torch uses; elsewhere `lora_b @ lora_a`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lora_runtime.ops._extension import extension_loaded

__all__ = ["MergeStore", "fused_merge_applies", "lora_product", "merge_enter", "merge_leave"]


class MergeStore(NamedTuple):
    """What restores one merged weight exactly.

    Attributes:
        mask: uint8 `[ceil(numel / 8)]`, bit j of byte i flags element 8i + j; None when no
            element needs patching or `copy` is kept.
        values: `[n_patched]`, the flagged elements' original values, W's dtype.
        copy: W at entry `[out, in]` when that is smaller than mask + values, else None.
        checksum: int64 sum of W's bit patterns (0 with `copy`).
    """

    mask: torch.Tensor | None
    values: torch.Tensor
    copy: torch.Tensor | None
    checksum: int


def fused_merge_applies(weight: torch.Tensor, lora_b: torch.Tensor, lora_a: torch.Tensor) -> bool:
    """True when `merge_enter` / `merge_leave` can run on these tensors."""
    tensors = (weight, lora_b, lora_a)
    return (
        extension_loaded()
        and all(t.device.type == "cpu" and t.is_contiguous() and t.dim() == 2 for t in tensors)
        and lora_b.shape[0] == weight.shape[0]
        and lora_a.shape[1] == weight.shape[1]
        and weight.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    )


def lora_product(lora_b: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """`lora_b @ lora_a`, the rank-r product of a merge (see the module docstring).

    Args:
        lora_b: `[out, r]`; lora_a: `[r, in]`; one dtype, float32 or float64 for the library's
            own loop (any other dtype or device: `lora_b @ lora_a`).

    Returns:
        A new `[out, in]` tensor in the factors' dtype.
    """
    if (
        extension_loaded()
        and lora_b.device.type == "cpu"
        and lora_a.device.type == "cpu"
        and lora_b.dtype == lora_a.dtype
        and lora_a.dtype in (torch.float32, torch.float64)
    ):
        return torch.ops.lora_runtime.lora_product(lora_b, lora_a)
    return lora_b @ lora_a


def merge_enter(weight: torch.Tensor, lora_b: torch.Tensor, lora_a: torch.Tensor,
                scaling: float) -> MergeStore:
    """Merges in place: `weight <- round(weight + scaling * lora_b @ lora_a)`.

    Args:
        weight: `[out, in]`, contiguous, CPU; overwritten.
        lora_b: `[out, r]`, lora_a: `[r, in]`, contiguous, float32 (float64 for a float64
            weight).
        scaling: the LoRA scale.

    Returns:
        The `MergeStore` that `merge_leave` needs.
    """
    mask, values, copy, checksum = torch.ops.lora_runtime.merge_enter(weight, lora_b, lora_a, scaling)
    return MergeStore(
        mask if mask.numel() else None, values, copy if copy.numel() else None, int(checksum)
    )


def merge_leave(weight: torch.Tensor, lora_b: torch.Tensor, lora_a: torch.Tensor,
                scaling: float, store: MergeStore) -> int:
    """Restores in place: `weight <- round(weight - scaling * lora_b @ lora_a)`, patched by `store`.

    Args:
        weight: the merged weight, `[out, in]`; overwritten with the original.
        lora_b, lora_a, scaling: as given to `merge_enter`.
        store: `merge_enter`'s result (without a copy: the caller copies that back itself).

    Returns:
        The checksum of the restored weight (equal to `store.checksum` when exact).
    """
    mask = store.mask if store.mask is not None else weight.new_empty(0, dtype=torch.uint8)
    return int(torch.ops.lora_runtime.merge_leave(weight, lora_b, lora_a, scaling, mask, store.values))


if extension_loaded():

    @torch.library.register_fake("lora_runtime::merge_enter")
    def _merge_enter_fake(weight, lora_b, lora_a, scaling):
        # mask, values and copy have data-dependent sizes (which store is smaller depends on
        # how many elements the restore would miss).
        ctx = torch.library.get_ctx()
        mask = weight.new_empty((ctx.new_dynamic_size(),), dtype=torch.uint8)
        values = weight.new_empty((ctx.new_dynamic_size(),))
        copy = weight.new_empty((ctx.new_dynamic_size(), *weight.shape[1:]))  # [out | 0, in]
        return mask, values, copy, weight.new_empty((), dtype=torch.int64)

    @torch.library.register_fake("lora_runtime::lora_product")
    def _lora_product_fake(lora_b, lora_a):
        return lora_a.new_empty((lora_b.shape[0], lora_a.shape[1]))

    @torch.library.register_fake("lora_runtime::merge_leave")
    def _merge_leave_fake(weight, lora_b, lora_a, scaling, mask, values):
        return weight.new_empty((), dtype=torch.int64)  # the checksum
