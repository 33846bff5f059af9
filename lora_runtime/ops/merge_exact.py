"""The exact, reversible merge of one weight in one pass each way (`csrc/merge_exact.cpp`).

`merge_enter(weight, product, scaling)` writes `round(W + scaling * product)` into `weight`
and returns what gives W back bit for bit: a packed mask and the original values of the
elements where `round(M - scaling * product)` misses W, or a plain copy of W when that patch
would not be smaller. `merge_leave` undoes it. `product` is the raw `B @ A` in the
accumulation dtype (float32; float64 for a float64 weight). Both run on contiguous CPU
tensors with the extension loaded (`fused_merge_applies`); callers fall back to tensor ops
otherwise.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lora_runtime.ops._extension import extension_loaded

__all__ = ["MergeStore", "fused_merge_applies", "merge_enter", "merge_leave"]


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


def fused_merge_applies(weight: torch.Tensor, product: torch.Tensor) -> bool:
    """True when `merge_enter` / `merge_leave` can run on these tensors."""
    return (
        extension_loaded()
        and weight.device.type == "cpu"
        and product.device.type == "cpu"
        and weight.is_contiguous()
        and product.is_contiguous()
        and weight.shape == product.shape
        and weight.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    )


def merge_enter(weight: torch.Tensor, product: torch.Tensor, scaling: float) -> MergeStore:
    """Merges in place: `weight <- round(weight + scaling * product)`.

    Args:
        weight: `[out, in]`, contiguous, CPU; overwritten.
        product: `B @ A`, `[out, in]`, float32 (float64 for a float64 weight).
        scaling: the LoRA scale.

    Returns:
        The `MergeStore` that `merge_leave` needs.
    """
    mask, values, copy, checksum = torch.ops.lora_runtime.merge_enter(weight, product, scaling)
    return MergeStore(
        mask if mask.numel() else None, values, copy if copy.numel() else None, int(checksum)
    )


def merge_leave(weight: torch.Tensor, product: torch.Tensor, scaling: float,
                store: MergeStore) -> int:
    """Restores in place: `weight <- round(weight - scaling * product)`, patched by `store`.

    Args:
        weight: the merged weight, `[out, in]`; overwritten with the original.
        product, scaling: as given to `merge_enter`.
        store: `merge_enter`'s result (without a copy: the caller copies that back itself).

    Returns:
        The checksum of the restored weight (equal to `store.checksum` when exact).
    """
    mask = store.mask if store.mask is not None else weight.new_empty(0, dtype=torch.uint8)
    return int(torch.ops.lora_runtime.merge_leave(weight, product, scaling, mask, store.values))


if extension_loaded():

    @torch.library.register_fake("lora_runtime::merge_enter")
    def _merge_enter_fake(weight, product, scaling):
        # mask, values and copy have data-dependent sizes (which store is smaller depends on
        # how many elements the restore would miss).
        ctx = torch.library.get_ctx()
        mask = weight.new_empty((ctx.new_dynamic_size(),), dtype=torch.uint8)
        values = weight.new_empty((ctx.new_dynamic_size(),))
        copy = weight.new_empty((ctx.new_dynamic_size(), *weight.shape[1:]))  # [out | 0, in]
        return mask, values, copy, weight.new_empty((), dtype=torch.int64)

    @torch.library.register_fake("lora_runtime::merge_leave")
    def _merge_leave_fake(weight, product, scaling, mask, values):
        return weight.new_empty((), dtype=torch.int64)  # the checksum
