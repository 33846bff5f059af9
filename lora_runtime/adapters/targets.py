"""Which modules of a model are adapted: target matching, the patched layers, paths.

One place for the rules every other module uses: a dotted module path matches a target
name on a dot boundary (as in PEFT), or a regex string must match the whole path; a module
inside an already patched layer (its `base_layer`, `lora_A`, `lora_B`) is never a target.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from lora_runtime.adapters.layer import LoRALinear

# The modules RLinf adapts by default, matched on the last dotted component(s) of a name.
DEFAULT_TARGETS: tuple[str, ...] = (
    "proj", "qkv", "fc1", "fc2", "q", "kv", "fc3", "q_proj", "k_proj", "v_proj", "o_proj",
    "gate_proj", "up_proj", "down_proj", "lm_head",
)

__all__ = [
    "DEFAULT_TARGETS",
    "find_targets",
    "inside_any",
    "iter_lora_layers",
    "matches_target",
    "restore_base_layers",
    "set_submodule",
    "target_predicate",
    "unwrap_model",
]


def matches_target(name: str, targets: Iterable[str]) -> bool:
    """True when a dotted module name ends with one of `targets` on a dot boundary.

    `"model.layers.0.self_attn.q_proj"` matches `"q_proj"` and `"self_attn.q_proj"`;
    `"attn.q_proj"` does not match `"proj"` (as in PEFT).
    """
    return any(name == t or name.endswith("." + t) for t in targets)


def target_predicate(targets: Iterable[str] | str) -> Callable[[str], bool]:
    """`matches_target` for a list of names; `re.fullmatch` for a regex string (PEFT's rule)."""
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return lambda name: pattern.fullmatch(name) is not None
    names = tuple(targets)
    return lambda name: matches_target(name, names)


def inside_any(path: str, roots: Iterable[str]) -> bool:
    """True when module `path` is one of `roots` or lies inside one (`root.` prefix)."""
    return any(path == r or path.startswith(r + ".") for r in roots)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside `torch.compile` (`_orig_mod`) and DDP (`module`) wrappers."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def iter_lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Yields `(module path, LoRALinear)` for every patched module, in module order.

    Paths are those of the unwrapped model (no `_orig_mod.` / `module.` prefixes).
    """
    for name, module in unwrap_model(model).named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Puts `module` at dotted `path` of `model` (the parent must exist)."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def find_targets(
    model: nn.Module,
    target_modules: Iterable[str] | str,
    exclude_modules: Iterable[str] = (),
) -> list[tuple[str, nn.Linear]]:
    """The `nn.Linear` modules `apply_lora` would patch, as `(path, module)`.

    Args:
        model: any module (wrappers are unwrapped).
        target_modules: names (dot-boundary suffix match) or one regex string (full match).
        exclude_modules: names never patched (same suffix match).

    Warns once about target names that hit modules of other types (they are skipped).
    """
    model = unwrap_model(model)
    wanted, excludes = target_predicate(target_modules), tuple(exclude_modules)
    found: list[tuple[str, nn.Linear]] = []
    skipped: list[str] = []
    lora_paths = [n for n, _ in iter_lora_layers(model)]
    for name, module in model.named_modules():
        if not name or inside_any(name, lora_paths):
            continue  # the root, or an already patched layer and its parts
        if not wanted(name) or matches_target(name, excludes):
            continue
        if isinstance(module, nn.Linear):
            found.append((name, module))
        else:
            skipped.append(f"{name} ({type(module).__name__})")
    if skipped:
        shown = ", ".join(skipped[:8]) + (f", ... ({len(skipped)} in all)" if len(skipped) > 8 else "")
        warnings.warn(
            f"apply_lora: skipping modules that match a target but are not nn.Linear: {shown}",
            UserWarning,
            stacklevel=3,
        )
    return found


def restore_base_layers(model: nn.Module) -> None:
    """Puts each `LoRALinear`'s `base_layer` back in its place (the adapters are dropped)."""
    inner = unwrap_model(model)
    for name, layer in list(iter_lora_layers(inner)):
        set_submodule(inner, name, layer.base_layer)
