"""Whole modules trained beside the adapters and saved with them: PEFT's `modules_to_save`.

`mark_modules_to_save(model, ["value_head"])` names submodules (a PPO value head, a new
classifier) whose every parameter is saved in the adapter folder under PEFT's keys
(`base_model.model.<path>.<param>`) and listed in `adapter_config.json`'s
`modules_to_save`, so that PEFT's `PeftModel.from_pretrained` loads them into a base that
has those modules. `load_adapter` restores them into a model that has them and leaves a
model without them (say, one patched only for evaluation) as it is.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_runtime._dist import copy_full_, full_tensor
from lora_runtime.adapters.targets import unwrap_model

PEFT_PREFIX = "base_model.model."  # PEFT's prefix of every key in adapter_model.safetensors

_ATTR = "_lora_runtime_modules_to_save"


def mark_modules_to_save(model: nn.Module, paths: list[str]) -> None:
    """Records `paths` (submodules of `model`) as saved with the adapter.

    Raises:
        ValueError: a path that names no submodule of `model`.
    """
    inner = unwrap_model(model)
    for path in paths:
        try:
            inner.get_submodule(path)
        except AttributeError:
            raise ValueError(f"mark_modules_to_save: the model has no submodule {path!r}") from None
    setattr(inner, _ATTR, tuple(dict.fromkeys((*getattr(inner, _ATTR, ()), *paths))))


def modules_to_save(model: nn.Module) -> tuple[str, ...]:
    """The paths marked with `mark_modules_to_save`, in order."""
    return tuple(getattr(unwrap_model(model), _ATTR, ()))


def saved_module_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """`{"base_model.model.<path>.<param>": tensor}` of every marked module (FSDP2 shards
    gathered: a collective), as `adapter_model.safetensors` stores them."""
    inner = unwrap_model(model)
    return {f"{PEFT_PREFIX}{path}.{key}": full_tensor(t.detach())
            for path in modules_to_save(inner) for key, t in inner.get_submodule(path).state_dict().items()}


def check_saved_modules(model: nn.Module, modules: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Problems loading `modules` (`{path: state}`) into `model`; modules it lacks are skipped."""
    inner = unwrap_model(model)
    problems = []
    for path, state in modules.items():
        try:
            module = inner.get_submodule(path)
        except AttributeError:
            continue
        live = module.state_dict()
        if any(name.endswith("lora_A.weight") for name in live):
            problems.append(f"saved module {path} is a LoRA layer of this model: a module is either adapted or "
                            "saved whole (modules_to_save), not both")
            continue
        if set(live) != set(state):
            problems.append(f"saved module {path}: keys {sorted(state)}, the model's are {sorted(live)}")
            continue
        problems += [f"saved module {path}.{k} has shape {list(state[k].shape)}, expected {list(v.shape)}"
                     for k, v in live.items() if tuple(state[k].shape) != tuple(v.shape)]
    return problems


def load_saved_modules(model: nn.Module, modules: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copies checked `modules` into the model's submodules of the same paths (if it has them)."""
    inner = unwrap_model(model)
    for path, state in modules.items():
        try:
            module = inner.get_submodule(path)
        except AttributeError:
            continue
        for key, t in module.state_dict().items():
            copy_full_(t, state[key])
