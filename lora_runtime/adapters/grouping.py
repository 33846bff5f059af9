"""Finding sibling LoRA layers (those that read the same input tensor) on any model.

`group_siblings(model, *example_args)` runs one no-grad forward with a pre-hook on every
`LoRALinear`, groups the layers that received the very same tensor object (q/k/v of an
attention, gate/up of a gated MLP, in any model: nothing here knows a model's names) and
links each group's members to a shared `SiblingGroup`. Parameters and module paths are
untouched, so saving, loading, merging, FSDP2/DDP and `adapter_disabled` see no change.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lora_runtime.adapters.layer import LoRALinear
from lora_runtime.adapters.siblings import SiblingGroup
from lora_runtime.adapters.targets import iter_lora_layers, unwrap_model

__all__ = ["group_siblings", "sibling_groups", "ungroup_siblings"]


def _record_inputs(model: nn.Module, run: Callable[[nn.Module], object]) -> list[list[str]]:
    """Paths of the LoRA layers that got the same input object on one forward, call order."""
    layers = list(iter_lora_layers(model))
    by_input: dict[int, list[str]] = {}
    seen: set[str] = set()
    alive: list[torch.Tensor] = []  # keeps every recorded input alive, so ids stay unique

    def hook_for(path: str):
        def hook(_module, inputs):
            if path in seen or not inputs or not isinstance(inputs[0], torch.Tensor):
                return
            seen.add(path)  # a layer called twice (weight sharing) is grouped by its first call
            alive.append(inputs[0])
            by_input.setdefault(id(inputs[0]), []).append(path)

        return hook

    handles = [layer.register_forward_pre_hook(hook_for(path)) for path, layer in layers]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            run(model)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [paths for paths in by_input.values() if len(paths) >= 2]


def ungroup_siblings(model: nn.Module) -> None:
    """Puts every LoRA layer of `model` back on its own per-layer path."""
    for _, layer in iter_lora_layers(unwrap_model(model)):
        if layer._group is not None:
            layer._group.clear()
        layer._group, layer._slot = None, 0


def group_siblings(
    model: nn.Module,
    *example_args,
    run: Callable[[nn.Module], object] | None = None,
    **example_kwargs,
) -> list[list[str]]:
    """Groups the LoRA layers that read the same input, found on one example forward.

    Each group's shrink GEMMs (and the backward's `dA` / LoRA-`dx` GEMMs) run as one
    (`ops.lora_group`); at run time a member whose input is not the leader's falls back to
    its own path, so outputs never depend on the grouping. Calling it again regroups.

    Args:
        model: a patched model (or its compiled / DDP wrapper).
        *example_args, **example_kwargs: one valid input of `model` (a tiny batch suffices),
            run once under `torch.no_grad()` in eval mode.
        run: instead of example arguments, a function that runs one forward of the model
            it is given (e.g. a task's logits function on one sample).

    Returns:
        The groups, as lists of module paths in call order (empty when no two layers share
        an input).

    Raises:
        ValueError: the model has no LoRA layers.
    """
    inner = unwrap_model(model)
    layers = dict(iter_lora_layers(inner))
    if not layers:
        raise ValueError("group_siblings: the model has no LoRA layers (patch it with apply_lora)")
    ungroup_siblings(inner)
    if run is None:
        def run(m: nn.Module) -> object:
            return m(*example_args, **example_kwargs)

    groups = _record_inputs(inner, run)
    for paths in groups:
        members: list[LoRALinear] = [layers[p] for p in paths]
        group = SiblingGroup(members)
        for slot, member in enumerate(members):
            member._group, member._slot = group, slot
    return groups


def sibling_groups(model: nn.Module) -> list[list[str]]:
    """The current groups of `model`, as module paths (leader first)."""
    names = {id(layer): path for path, layer in iter_lora_layers(unwrap_model(model))}
    out, seen = [], set()
    for _, layer in iter_lora_layers(unwrap_model(model)):
        group = layer._group
        if group is not None and id(group) not in seen:
            seen.add(id(group))
            out.append([names[id(m)] for m in group.members])
    return out
