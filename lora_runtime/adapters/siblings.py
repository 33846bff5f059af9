"""`SiblingGroup`: LoRA layers that read the same input, run as one grouped op.

A group is made by `adapters.grouping.group_siblings` from one recorded forward. At run
time its first member (slot 0, the leader) computes every member's output with
`ops.lora_group` and keeps the followers' outputs with the input they were computed from;
a follower takes its output only when it is called with that very tensor (same object,
unchanged in place), and otherwise runs its own per-layer path. So a model whose members
get different inputs on some call stays exact: it only loses the saving.

The leader groups only while every member is active (not disabled, not merged), has no
live LoRA dropout (PEFT draws an independent mask per layer; the grouped shrink needs one
shared input) and a frozen base layer (the op gives no base-weight gradient); otherwise
each member runs alone.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_runtime.ops.infer import lora_group_infer
from lora_runtime.ops.lora_group import lora_group

__all__ = ["SiblingGroup"]


def _in_process_group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _version(t: torch.Tensor) -> int:
    """`t._version`; inference tensors keep none (they cannot be changed outside
    inference mode, and inside it a write between two members is not caught)."""
    return -1 if t.is_inference() else t._version


class SiblingGroup:
    """The shared state of sibling `LoRALinear` layers (duck-typed: no import of the layer).

    Args:
        members: the layers, in the order the model calls them; at least two, all with the
            same `in_features`.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = members
        self._x: torch.Tensor | None = None  # the input the pending outputs were computed from
        self._x_version = 0
        self._pending: list[torch.Tensor | None] = [None] * len(members)
        self._a_key: tuple | None = None  # no-grad cache of the stacked A
        self._a_cached: torch.Tensor | None = None

    def clear(self) -> None:
        """Drops pending outputs and caches (ungrouping, or between uses)."""
        self._x = None
        self._pending = [None] * len(self.members)
        self._a_key = self._a_cached = None

    def run(self, slot: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member `slot`'s output for input `x`, or None: the member runs its own path."""
        if slot == 0:
            return self._lead(x)
        y = self._pending[slot]
        if y is None or x is not self._x:
            return None
        if not torch.compiler.is_compiling() and _version(x) != self._x_version:
            return None  # x was changed in place after the leader read it
        self._pending[slot] = None
        if all(p is None for p in self._pending):
            self._x = None  # every follower served: hold no activation
        return y

    def _groupable(self) -> bool:
        for m in self.members:
            if m.disable_adapters or m.merged or (m.training and m.lora_dropout > 0.0):
                return False
            base = m.base_layer
            if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
                return False
        return True

    def _stacked_a(self, dtype: torch.dtype) -> torch.Tensor:
        """`cat(A_i)`, `[R, in]`, in the base dtype; cached across no-grad calls (eager)."""
        weights = [m.lora_A.weight for m in self.members]
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or _in_process_group():
            # autograd splits dA back; under FSDP2 the gathered A is refilled in place each
            # forward without a version bump, so a cache keyed on (data_ptr, _version) would
            # go stale (seen: load_adapter into a sharded actor kept the old A). A forward with
            # grad also drops the cache: an optimizer step may follow, and the fused AdamW
            # (torch._fused_adamw_) changes A in place without bumping its version.
            self._a_key = self._a_cached = None
            return torch.cat([w.to(dtype) for w in weights])
        key = (dtype, *((w.data_ptr(), w._version) for w in weights))
        if key != self._a_key or self._a_cached is None:
            self._a_cached = torch.cat([w.to(dtype) for w in weights])
            self._a_key = key
        return self._a_cached

    def _lead(self, x: torch.Tensor) -> torch.Tensor | None:
        self._x = None
        self._pending = [None] * len(self.members)
        if not self._groupable():
            return None
        dtype = self.members[0].base_layer.weight.dtype
        run = lora_group if torch.is_grad_enabled() else lora_group_infer
        ys = run(
            x,
            [m.base_layer.weight for m in self.members],
            [m.base_layer.bias for m in self.members],
            self._stacked_a(dtype),
            [m.lora_B.weight.to(dtype) for m in self.members],
            [m.scaling for m in self.members],
        )
        self._pending = [None, *ys[1:]]
        self._x = x
        if not torch.compiler.is_compiling():
            self._x_version = _version(x)
        return ys[0]
