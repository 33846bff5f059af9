"""`adapter_disabled`: the base model's exact outputs from a patched model (the reference policy)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lora_runtime.adapters.merge import MergeError
from lora_runtime.adapters.targets import iter_lora_layers, unwrap_model

__all__ = ["adapter_disabled"]


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes exactly the base model (reference log-probs).

    Sets `disable_adapters` on every LoRA layer, whose forward is then `base_layer(x)`:
    outputs are bit-identical to the unpatched model's, no weight is copied or changed.
    Works eager and compiled (the disabled state compiles once, then is reused). Nesting
    is allowed; on exit each layer gets back the flag it had at entry.

    Args:
        model: a patched model (or its `torch.compile` wrapper).

    Yields:
        `model`.

    Raises:
        ValueError: the model has no LoRA layer (a full-mode actor has no adapter to
            disable; use a separate reference model).
        MergeError: called inside `merged(...)` (the base weights hold the merged sum).
    """
    layers = list(iter_lora_layers(unwrap_model(model)))
    if not layers:
        raise ValueError(
            "adapter_disabled: the model has no LoRA layers, so it is already the policy "
            "itself (full mode?); a reference model must be kept separately"
        )
    merged_paths = [path for path, layer in layers if layer.merged]
    if merged_paths:
        raise MergeError(
            f"adapter_disabled: layer '{merged_paths[0]}' is merged by merged(...), so its base "
            "weight is not the base model's; leave merged(...) first"
        )
    previous = [layer.disable_adapters for _, layer in layers]
    for _, layer in layers:
        layer.disable_adapters = True
    try:
        yield model
    finally:
        for (_, layer), flag in zip(layers, previous, strict=True):
            layer.disable_adapters = flag
