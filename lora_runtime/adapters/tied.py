"""Tied base weights: finding them, untying one layer for a merge, and tying it back.

A tied model (`tie_word_embeddings=True`: most small Qwen2.5 / Llama-3.2 checkpoints)
holds one `Parameter` both as the input embedding and as `lm_head.weight`. When `lm_head`
is adapted, its merged weight differs from the embedding, so merging unties it: the other
owners keep the base weight and the layer gets a new `Parameter` with the merged one.
`merged(...)` ties it back on exit (the original `Parameter` object, untouched).
"""

from __future__ import annotations

from torch import nn

from lora_runtime.adapters.layer import LoRALinear

__all__ = ["mark_untied", "retie", "tied_paths", "untie"]


def tied_paths(model: nn.Module, layers: list[tuple[str, LoRALinear]]) -> dict[str, list[str]]:
    """`{layer path: [other parameter names]}` for LoRA layers whose base weight is shared.

    Args:
        model: the unwrapped model.
        layers: its `(path, LoRALinear)` pairs.
    """
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    tied = {}
    for path, layer in layers:
        own = f"{path}.base_layer.weight" if path else "base_layer.weight"
        others = [n for n in owners.get(id(layer.base_layer.weight), []) if n != own]
        if others:
            tied[path] = others
    return tied


def untie(layer: LoRALinear) -> nn.Parameter:
    """Gives `layer.base_layer` its own copy of its weight; returns the shared original.

    The copy has the original's values, dtype, device and `requires_grad`; the other
    owners keep the original object.
    """
    shared = layer.base_layer.weight
    layer.base_layer.weight = nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad)
    return shared


def retie(layer: LoRALinear, shared: nn.Parameter) -> None:
    """Puts the shared `Parameter` returned by `untie` back into `layer.base_layer`."""
    layer.base_layer.weight = shared


def mark_untied(model: nn.Module) -> None:
    """Sets `tie_word_embeddings = False` on a transformers model's config (and its text
    config), so `save_pretrained` writes both tensors and loading does not tie them again.
    Models without such a config are left alone."""
    config = getattr(model, "config", None)
    if config is None:
        return
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        configs.append(get_text())
    for sub in configs:
        if getattr(sub, "tie_word_embeddings", False):
            sub.tie_word_embeddings = False
