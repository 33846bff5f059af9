"""Patching a model: `apply_lora` swaps `LoRALinear` in, `remove_lora` takes it out."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lora_runtime.adapters.layer import LoRALinear, check_rank
from lora_runtime.adapters.merge import merge_lora
from lora_runtime.adapters.targets import (
    DEFAULT_TARGETS,
    find_targets,
    iter_lora_layers,
    restore_base_layers,
    set_submodule,
    unwrap_model,
)

__all__ = ["apply_lora", "remove_lora"]


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: Iterable[str] | str = DEFAULT_TARGETS,
    exclude_modules: Iterable[str] = (),
    init: str = "gaussian",
    use_rslora: bool = False,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Replaces every targeted `nn.Linear` of `model` with a `LoRALinear`, in place.

    Args:
        model: any module; it knows nothing of LoRA.
        rank: adapter rank r.
        alpha: `lora_alpha`; None means `rank` (scaling 1.0).
        dropout: LoRA dropout probability.
        target_modules: names matched on the last dotted component(s) of module paths, or
            one regex string that must match a whole path (as in PEFT).
        exclude_modules: names (same matching) never patched.
        init: "gaussian" or "kaiming" (B is zero either way, so outputs are unchanged).
        use_rslora: scaling `alpha / sqrt(r)`.
        generator: draws every `lora_A`, in module order (a CPU generator; the same
            generator state gives the same adapters); None uses torch's default generator.

    Returns:
        `model`, patched.

    Raises:
        ValueError: no module matched (the message lists the targets and some linear
            module names of the model), or a rank that does not fit a module (named).
            Nothing is patched when an error is raised.
    """
    model_ = unwrap_model(model)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    found = find_targets(model_, targets, exclude_modules)
    if not found:
        linears = [n for n, m in model_.named_modules() if isinstance(m, nn.Linear)]
        sample = ", ".join(linears[:10]) or "none"
        raise ValueError(
            f"apply_lora: no nn.Linear module matches target_modules={targets!r} "
            f"(exclude_modules={list(exclude_modules)}). Linear modules in this model: {sample}"
            + (" ..." if len(linears) > 10 else "")
        )
    for name, module in found:  # validate everything before changing anything
        check_rank(rank, module.in_features, module.out_features, f"apply_lora: module '{name}'")
    layers = [
        (name, LoRALinear(module, rank, alpha, dropout, use_rslora=use_rslora, init=init))
        for name, module in found
    ]
    if generator is not None:
        for _, layer in layers:
            layer.reset_lora_parameters(init, generator)
    for name, layer in layers:
        set_submodule(model_, name, layer)
    return model


@torch.no_grad()
def remove_lora(model: nn.Module, merge: bool) -> nn.Module:
    """Puts plain `nn.Linear` modules back in place of every `LoRALinear`.

    Args:
        model: a patched model.
        merge: fold `scaling * B @ A` into the base weight (`merge.merge_lora`: summed in
            float32, float64 for float64 weights, rounded once); False drops the adapters
            and keeps the base weights.

    Returns:
        `model`, unpatched.

    Raises:
        RuntimeError: a layer is currently merged by `merged(...)` (leave that first).
        ValueError / MergeError: `merge=True` and `merge_lora` refuses (non-finite adapter,
            adapters disabled); nothing is changed. A tied base weight is untied.
    """
    layers = list(iter_lora_layers(model))
    for name, layer in layers:
        if layer.merged:
            raise RuntimeError(
                f"remove_lora: layer '{name}' is merged by merged(...); leave that context first"
            )
    if merge and layers:
        return merge_lora(model)  # checks everything, merges, then puts the base layers back
    restore_base_layers(model)
    return model
