"""Which modules of an actor become FSDP2 units: its repeated blocks, never a LoRA layer."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from lora_runtime.adapters import LoRALinear, iter_lora_layers, unwrap_model
from lora_runtime.adapters.targets import inside_any

__all__ = ["find_blocks"]


def _no_split_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return names


def _uniform_lists(model: nn.Module) -> list[nn.Module]:
    """Items of every `nn.ModuleList` whose items share one class holding parameters."""
    leaf_types = (nn.Linear, nn.Embedding, LoRALinear, nn.LayerNorm)
    blocks = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            kinds = {type(c) for c in m}
            if len(kinds) == 1 and not issubclass(kinds.pop(), leaf_types):
                blocks.extend(c for c in m if any(True for _ in c.parameters()))
    return blocks


def find_blocks(
    model: nn.Module, block_types: Iterable[type | str] | None = None
) -> list[tuple[str, nn.Module]]:
    """The repeated blocks `shard_actor` turns into FSDP2 units, outermost first.

    Args:
        model: the (patched or full) actor.
        block_types: classes or class names to shard; None means the model's
            `_no_split_modules` (transformers) or else the items of every `nn.ModuleList`
            of same-class, non-leaf modules (the built-in actor's blocks).

    Returns:
        `(path, module)` pairs; a block nested in another block is left out.

    Raises:
        ValueError: a chosen block is a `LoRALinear` or lies inside one (its base weight and
            adapter would land in different units).
    """
    root = unwrap_model(model)
    if block_types is not None:
        wanted = {t if isinstance(t, str) else t.__name__ for t in block_types}
        chosen = {id(m) for m in root.modules() if type(m).__name__ in wanted}
    elif _no_split_names(root):
        names = _no_split_names(root)
        chosen = {id(m) for m in root.modules() if type(m).__name__ in names}
    else:
        chosen = {id(m) for m in _uniform_lists(root)}
    lora_paths = [p for p, _ in iter_lora_layers(root)]
    blocks: list[tuple[str, nn.Module]] = []
    for path, m in root.named_modules():
        if id(m) not in chosen or m is root:
            continue
        if inside_any(path, lora_paths):
            raise ValueError(
                f"find_blocks: '{path}' ({type(m).__name__}) is or lies inside a LoRALinear; a "
                "LoRALinear's base weight and adapter must stay in one FSDP unit; pick the "
                "enclosing block's class in block_types"
            )
        if any(path.startswith(b + ".") for b, _ in blocks):
            continue  # nested in a block already chosen
        blocks.append((path, m))
    return blocks
