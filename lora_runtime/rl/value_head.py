"""PPO's value head: `Linear(D, 1)` on the actor's last hidden state, trained with the policy.

It is a submodule of the actor (`model.value_head`), so DDP and FSDP2 wrap it with the
actor, the optimizer and the training state hold it, and it is saved with the weights:

- LoRA modes: in the adapter, under PEFT's `modules_to_save` convention
  (`base_model.model.value_head.weight` / `.bias` in `adapter_model.safetensors`,
  `"modules_to_save": ["value_head"]` in `adapter_config.json`), so that PEFT's
  `PeftModel.from_pretrained` loads it into a base that has a `value_head` module;
- full mode: `value_head.safetensors` beside the model folder's `model.safetensors` (the
  model's own weights stay loadable by its family).

A resumed run (`lora_path` or a full run's `model_path`) restores the head it finds there;
otherwise the head starts from a small init (`learners.make_value_head`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from safetensors.torch import load_file, save
from torch import nn

from lora_runtime._fs import write_bytes_atomic
from lora_runtime.adapters import PEFT_PREFIX, mark_modules_to_save, unwrap_model
from lora_runtime.adapters.peft_format import ADAPTER_WEIGHTS_NAME
from lora_runtime.config import RunConfig
from lora_runtime.rl.learners import make_value_head
from lora_runtime.rl.models import ModelFamily
from lora_runtime.rl.seeding import RunSeeds

VALUE_HEAD = "value_head"
FULL_MODE_FILE = "value_head.safetensors"


def saved_value_head(run_cfg: RunConfig) -> dict[str, torch.Tensor] | None:
    """The head saved with the weights this run starts from, as `{"weight", "bias"}`, or None."""
    mc = run_cfg.actor.model
    if mc.mode == "resume":
        path = os.path.join(mc.lora_path, ADAPTER_WEIGHTS_NAME)
        prefix = f"{PEFT_PREFIX}{VALUE_HEAD}."
    elif mc.mode == "full" and mc.model_path is not None:
        path, prefix = os.path.join(mc.model_path, FULL_MODE_FILE), ""
    else:
        return None
    if not os.path.isfile(path):
        return None
    state = {k.removeprefix(prefix): v for k, v in load_file(path).items() if k.startswith(prefix)}
    return state if set(state) == {"weight", "bias"} else None


def attach_value_head(model: nn.Module, run_cfg: RunConfig, family: ModelFamily) -> nn.Linear:
    """Adds a trainable float32 `value_head` to `model` (restored when saved with its weights)."""
    inner = unwrap_model(model)
    device = next(inner.parameters()).device
    generator = RunSeeds(run_cfg.runner.seed).generator("value_head_init")
    head = make_value_head(family.hidden_size(inner), torch.float32, device, generator)
    saved = saved_value_head(run_cfg)
    if saved is not None:
        head.load_state_dict({k: v.to(device, torch.float32) for k, v in saved.items()})
    setattr(inner, VALUE_HEAD, head)
    mark_modules_to_save(inner, [VALUE_HEAD])
    for p in head.parameters():
        p.requires_grad_(True)
    return head


@contextlib.contextmanager
def value_head_set_aside(model: nn.Module) -> Iterator[nn.Module | None]:
    """Takes the value head out of `model` for the block (the model folder of a full-mode
    run holds the model alone) and yields it (None when there is none)."""
    head = model._modules.pop(VALUE_HEAD, None)
    try:
        yield head
    finally:
        if head is not None:
            model._modules[VALUE_HEAD] = head


def save_full_mode_head(head: nn.Module, folder: str) -> None:
    """Writes `value_head.safetensors` (`weight`, `bias`) into a full-mode model folder, atomically."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
    write_bytes_atomic(os.path.join(folder, FULL_MODE_FILE), save(state, metadata={"format": "pt"}))
