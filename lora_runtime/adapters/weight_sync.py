"""Weight sync: the actor's current weights handed to a rollout engine, in memory (files for
deployment are `lora_runtime.deploy`'s).

Two payloads:

- `iter_merged_weights(model)`: the full merged model under the base model's names, one
  tensor at a time (for engines that load plain weights, e.g. vLLM's `load_weights`);
- `adapter_state_dict(model)`: only the adapter tensors in PEFT naming (for engines that
  apply LoRA themselves). Per adapted `Linear(in, out)` it holds `r * (in + out)`
  elements against `in * out` for the weight: for rank 16 on a 4096 x 4096 projection,
  0.8 %; over a whole transformer with all projections adapted, well under 1 % of the
  full state dict (embeddings and the head are large and usually not adapted).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from lora_runtime._dist import full_tensor, gathered
from lora_runtime.adapters.layer import LoRALinear
from lora_runtime.adapters.merge import check_mergeable, merged_weight
from lora_runtime.adapters.peft_format import PEFT_PREFIX
from lora_runtime.adapters.targets import iter_lora_layers, unwrap_model

__all__ = ["adapter_state_dict", "iter_merged_weights"]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, under PEFT's keys, as stored in `adapter_model.safetensors`.

    Args:
        model: a patched model (a compiled or DDP-wrapped one is unwrapped; FSDP2 shards
            are gathered, a collective).

    Returns:
        `{"base_model.model.<path>.lora_A.weight": [r, in], "...lora_B.weight": [out, r]}`,
        detached views of the live parameters (no copy) for ordinary tensors.
    """
    out: dict[str, torch.Tensor] = {}
    for path, layer in iter_lora_layers(model):
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = full_tensor(layer.lora_A.weight.detach())
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = full_tensor(layer.lora_B.weight.detach())
    return out


# Keys of a LoRALinear's own state, relative to its path, and what they become merged.
_LAYER_KEYS = {
    "base_layer.weight": "weight",
    "base_layer.bias": "bias",
    "lora_A.weight": None,
    "lora_B.weight": None,
}


def _split(key: str, layer_paths: set[str]) -> tuple[str, str] | None:
    """`(layer path, local key)` when `key` belongs to a LoRA layer, else None."""
    for local in _LAYER_KEYS:
        if key == local and "" in layer_paths:
            return "", local
        if key.endswith("." + local) and key[: -len(local) - 1] in layer_paths:
            return key[: -len(local) - 1], local
    return None


def iter_merged_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields `(name, tensor)` for every entry of the merged model's `state_dict`.

    Names are the base model's own (`...q_proj.weight`, no `base_layer`, no `lora_`);
    the sequence equals `merge_lora(copy.deepcopy(model)).state_dict().items()`, in the
    same order and bit for bit. Unadapted tensors are yielded as they are (detached, no
    copy); each adapted weight is merged when it is reached (`merged_weight`), so the
    generator itself holds at most one layer's temporaries (the float32 delta and the
    merged tensor). The model is never modified; all adapters are validated when this
    function is called, before anything is yielded. A tied base weight yields both names:
    the other owner's (e.g. `model.embed_tokens.weight`) with the base weight, the adapted
    layer's (`lm_head.weight`) with the merged one, as `merge_lora` unties them.

    Args:
        model: a patched model (or its `torch.compile` wrapper). A model without LoRA
            layers raises (use its `state_dict` directly).

    Returns:
        An iterator of `(name, tensor)` pairs; a merged weight is a new tensor the caller
        may keep.

    Raises:
        ValueError: no LoRA layer, or an adapter with non-finite values.
        MergeError: called inside `merged(...)` or `adapter_disabled(...)`.
    """
    inner = unwrap_model(model)  # compile and DDP wrappers
    layers = dict(check_mergeable(inner, "iter_merged_weights"))
    return _merged_items(inner, layers)


def _merged_items(
    model: nn.Module, layers: dict[str, LoRALinear]
) -> Iterator[tuple[str, torch.Tensor]]:
    paths = set(layers)
    for key, tensor in model.state_dict().items():
        owner = _split(key, paths)
        if owner is None:
            yield key, full_tensor(tensor)  # FSDP2: gathered, one tensor at a time
            continue
        path, local = owner
        new_local = _LAYER_KEYS[local]
        if new_local is None:
            continue  # lora_A / lora_B: folded into the weight
        name = f"{path}.{new_local}" if path else new_local
        if new_local == "weight":
            with gathered(layers[path]):  # FSDP2: this layer's W, A, B whole, then shards again
                merged = merged_weight(layers[path])
            yield name, merged
            del merged  # hold no merged weight while the next one is computed
        else:
            yield name, full_tensor(tensor)
