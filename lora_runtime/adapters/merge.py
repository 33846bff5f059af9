"""Folding adapters into the base weights: `merged(...)` (reversible, bit-exact) and
`merge_lora(...)` (permanent, for export and deployment).

The merged weight of a layer is `(W + scaling * B @ A)` summed in float32 (float64 for a
float64 weight) and rounded once to W's dtype (PEFT, merging in bf16, rounds twice).

`merged(model)` must give the original W back bit for bit, yet the merged weight M has
lost W's low bits wherever rounding moved them. Per layer it keeps the smaller exact store:
a patch (the restore computes `round(M - delta)` from the same adapters and patches the
elements where it differs from W, bit pattern against bit pattern, so -0.0 and NaN payloads
come back too: a bitmask, `numel / 8` bytes, plus the patched values in W's dtype), or a
plain copy of W when the patch would hold more (large deltas on small layers). Either way
it keeps a copy of lora_A and lora_B, so an adapter written inside cannot spoil the restore.
By default nothing is refused (at worst about one copy of the merged weights is held);
`max_extra_fraction` sets a budget, checked as layers are merged: past it, `merged` undoes
what it merged (exactly) and raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lora_runtime._dist import full_tensor
from lora_runtime.adapters.layer import LoRALinear
from lora_runtime.adapters.merge_store import (
    LayerRestore,
    add_delta,
    merge_layer,
    nbytes,
    restore_layer,
)
from lora_runtime.adapters.targets import iter_lora_layers, restore_base_layers, unwrap_model
from lora_runtime.adapters.tied import mark_untied, retie, tied_paths, untie
from lora_runtime.errors import MergeError

__all__ = ["MergeError", "MergeStats", "check_mergeable", "merge_lora", "merged", "merged_weight"]

def merged_weight(layer: LoRALinear) -> torch.Tensor:
    """`W + scaling * B @ A` summed in float32 (float64 for float64 W), cast to W's dtype.

    Args:
        layer: a LoRA layer; it is not modified.

    Returns:
        A new tensor `[out, in]` with the base weight's dtype and device.
    """
    return add_delta(layer.base_layer.weight.detach(), layer.get_delta_weight())


def check_mergeable(model: nn.Module, caller: str) -> list[tuple[str, LoRALinear]]:
    """Validates that every LoRA layer of `model` can be merged, before anything changes.

    Args:
        model: a patched model (or its `torch.compile` wrapper).
        caller: the public function's name, for the messages.

    Returns:
        The `(path, LoRALinear)` pairs, in module order.

    Raises:
        ValueError: no LoRA layer, or an adapter with NaN or infinite values (named).
        MergeError: a layer already merged by `merged(...)`, or adapters disabled by
            `adapter_disabled(...)`. A base weight tied to another parameter is allowed:
            the callers untie it (`adapters.tied`).
    """
    model = unwrap_model(model)
    layers = list(iter_lora_layers(model))
    if not layers:
        raise ValueError(f"{caller}: the model has no LoRA layers (apply_lora first)")
    for path, layer in layers:
        if layer.merged:
            raise MergeError(
                f"{caller}: layer '{path}' is already merged by merged(...); "
                "nesting is not allowed, leave the outer context first"
            )
        if layer.disable_adapters:
            raise MergeError(
                f"{caller}: layer '{path}' has its adapter disabled by adapter_disabled(...); "
                "leave that context first"
            )
        for key in ("lora_A", "lora_B"):
            w = full_tensor(getattr(layer, key).weight.detach())  # every rank sees all shards
            if not torch.isfinite(w).all():
                bad = int((~torch.isfinite(w)).sum())
                raise ValueError(
                    f"{caller}: adapter '{path}.{key}.weight' has {bad} non-finite "
                    "(NaN or inf) values; merging needs finite adapters. Nothing was changed"
                )
    return layers


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base weight for good and puts plain `nn.Linear` back.

    Each weight becomes `merged_weight(layer)`; the adapters are dropped. The result has
    the base model's module names and `state_dict` keys (no `base_layer`, no `lora_`).
    A tied base weight (`lm_head` sharing the input embedding) is untied: the other owners
    keep the base weight, the layer gets the merged one, and a transformers config gets
    `tie_word_embeddings = False` so that a saved folder holds both tensors.

    Args:
        model: a patched model.

    Returns:
        `model`, unpatched in place.

    Raises:
        ValueError: no LoRA layer, or non-finite adapter values (the model is unchanged).
        MergeError: called inside `merged(...)` or `adapter_disabled(...)` (the model is
            unchanged).
    """
    inner = unwrap_model(model)
    layers = check_mergeable(inner, "merge_lora")
    tied = tied_paths(inner, layers)
    for path, layer in layers:
        new = merged_weight(layer)  # [out, in]
        if path in tied:
            untie(layer)
        layer.base_layer.weight.copy_(new)
    if tied:
        mark_untied(inner)
    restore_base_layers(inner)
    return model


@dataclass
class MergeStats:
    """What `merged(...)` holds while open; filled when the weights are merged.

    Attributes:
        layers: number of merged layers.
        merged_bytes: bytes of the merged base weights.
        extra_bytes: bytes held for the exact restore (masks, patched values, adapter copies).
        patched_elements: elements whose original value is kept.
        total_elements: elements of the merged base weights.
        untied_bytes: bytes of the merged copies of tied base weights (a tied `lm_head`
            gets its own weight while the embedding keeps the shared one); not part of
            `extra_bytes` nor of the `max_extra_fraction` limit.
    """

    layers: int = 0
    merged_bytes: int = 0
    extra_bytes: int = 0
    patched_elements: int = 0
    total_elements: int = 0
    untied_bytes: int = 0

    @property
    def extra_fraction(self) -> float:
        """`extra_bytes / merged_bytes`."""
        return self.extra_bytes / self.merged_bytes if self.merged_bytes else 0.0


def _refuse_steps(restores: list[LayerRestore]) -> Callable[..., None]:
    """A global optimizer step pre-hook that raises when a step would touch a merged layer."""
    guarded = {
        id(t): item.path
        for item in restores
        for t in (item.layer.base_layer.weight, item.layer.lora_A.weight, item.layer.lora_B.weight)
    }

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in guarded:
                    raise MergeError(
                        f"merged: {type(optimizer).__name__}.step() inside merged(...) would "
                        f"update layer '{guarded[id(p)]}' (adapter or merged base weight); "
                        "nothing was changed. merged() is for inference: step the optimizer "
                        "outside it"
                    )

    return hook


@contextmanager
def merged(model: nn.Module, max_extra_fraction: float | None = None) -> Iterator[MergeStats]:
    """Folds every adapter into its base weight for the duration of the block.

    Inside, each LoRA layer computes `base_layer(x)` with the merged weight: base-model
    speed for rollouts. On exit every base weight is restored bit-exactly (any dtype) and
    the adapters are as they were. No full copy of any weight is kept: see the module
    docstring for what is held; `MergeStats.extra_bytes` reports it. A base weight tied to
    another parameter (`lm_head` and the input embedding) is untied for the block: the
    layer merges into its own copy (`MergeStats.untied_bytes`), the other owners keep the
    base weight, and on exit the layer gets the shared `Parameter` object back.

    Inside the block, `optimizer.step()` of any `torch.optim.Optimizer` that holds an
    adapter or a merged base weight raises `MergeError` before changing anything. Any
    other in-place change of an adapter is undone on exit (from the snapshot) and reported
    with `MergeError`, after the base weights have been restored exactly.

    Args:
        model: a patched model (or its `torch.compile` wrapper).
        max_extra_fraction: an optional budget: the most memory the exact restore may
            hold, as a fraction of the merged weights' bytes (> 0); None (default) never
            refuses (each layer keeps the smaller of its patch and a plain copy).

    Yields:
        `MergeStats` of this merge.

    Raises:
        ValueError: no LoRA layer, non-finite adapters, or a bad `max_extra_fraction`
            (the model is unchanged).
        MergeError: nested `merged`, inside `adapter_disabled`, or an exact restore needing a
            given `max_extra_fraction` or more (the model is unchanged);
            inside the block, an optimizer step on the adapters; on exit, an in-place
            change made inside the block.
    """
    limit = max_extra_fraction
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0
    ):
        raise ValueError(f"merged: max_extra_fraction={limit!r}; allowed: None or a number > 0")
    layers = check_mergeable(model, "merged")
    stats = MergeStats(
        layers=len(layers),
        merged_bytes=sum(nbytes(layer.base_layer.weight) for _, layer in layers),
        total_elements=sum(layer.base_layer.weight.numel() for _, layer in layers),
    )
    tied = tied_paths(unwrap_model(model), layers)
    shared: dict[str, tuple[LoRALinear, nn.Parameter]] = {}  # untied layers: the shared weight
    done: list[LayerRestore] = []
    try:
        with torch.no_grad():
            for path, layer in layers:
                if path in tied:
                    shared[path] = (layer, untie(layer))
                    stats.untied_bytes += nbytes(layer.base_layer.weight)
                done.append(merge_layer(path, layer))
                stats.extra_bytes += done[-1].nbytes
                stats.patched_elements += done[-1].values.numel()
                if limit is not None and stats.extra_bytes >= limit * stats.merged_bytes:
                    raise MergeError(
                        f"merged: restoring the base weights exactly would hold more than "
                        f"max_extra_fraction={max_extra_fraction} of the merged weights "
                        f"({stats.extra_bytes} bytes after {len(done)} of {len(layers)} layers, "
                        f"merged weights {stats.merged_bytes} bytes): the adapters' deltas are "
                        "large next to the weights. Nothing was changed; raise "
                        "max_extra_fraction, or use iter_merged_weights / merge_lora on a copy"
                    )
        hook = register_optimizer_step_pre_hook(_refuse_steps(done))
    except BaseException:
        with torch.no_grad():
            for item in reversed(done):
                restore_layer(item)
        for layer, weight in shared.values():
            retie(layer, weight)
        raise
    try:
        yield stats
    finally:
        hook.remove()
        with torch.no_grad():
            problems = [p for item in reversed(done) for p in restore_layer(item)]
        for layer, weight in shared.values():
            retie(layer, weight)
        if problems:
            raise MergeError(
                "merged: tensors were modified in place inside merged(...): "
                + "; ".join(problems) + ". merged() is for inference; write weights outside it"
            )
