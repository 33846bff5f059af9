"""`prepare_actor`: the facade from a validated `actor.model` config to a ready actor.

It sits above `adapters/`: the mode of the config decides whether adapters are drawn
(`new`), loaded (`resume`) or left out (`full`).
"""

from __future__ import annotations

import torch
from torch import nn

from lora_runtime.adapters import (
    DEFAULT_TARGETS,
    AdapterFiles,
    apply_and_load_adapter,
    apply_lora,
    iter_lora_layers,
    load_adapter,
    mark_only_lora_trainable,
    read_adapter,
)
from lora_runtime.config import ActorModelConfig

__all__ = ["prepare_actor"]


def prepare_actor(
    model: nn.Module,
    model_cfg: ActorModelConfig,
    adapter: AdapterFiles | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Applies the config's mode to a freshly loaded base model.

    - "new": patch the targets with rank `lora_rank` adapters (Gaussian init by default);
      only adapter parameters train.
    - "resume": patch with the r / alpha / targets of `lora_path/adapter_config.json`,
      load its weights; only adapter parameters train.
    - "full": nothing is patched; every parameter trains.

    Adapters are kept in `model_cfg.adapter_dtype` (float32 by default, whatever the base
    dtype); a resumed adapter is loaded into them at that precision.

    Args:
        model: the base model (unpatched).
        model_cfg: the validated `actor.model` section.
        adapter: resume mode only: `lora_path` already read with `read_adapter` (to check
            it before an expensive base load); None reads it here.
        generator: "new" mode: the CPU generator the adapters are drawn from (the same
            state gives the same adapters in any process).
        seed: "new" mode: shorthand for `generator=torch.Generator().manual_seed(seed)`.
            With neither, the adapters come from torch's default generator, which torch
            seeds at random in every process: pass one for a reproducible run.

    Returns:
        `model`, prepared in place.

    Raises:
        ValueError: both `generator` and `seed` given; see `apply_lora`.
        AdapterError: resume with a missing, malformed or mismatching adapter (the model is
            left unpatched).
    """
    if generator is not None and seed is not None:
        raise ValueError("prepare_actor: pass generator or seed, not both")
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    if any(True for _ in iter_lora_layers(model)):
        raise ValueError("prepare_actor: the model is already patched; pass the base model")
    mode = model_cfg.mode
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if mode == "new":
        apply_lora(
            model,
            rank=model_cfg.lora_rank,
            alpha=model_cfg.lora_alpha,
            dropout=model_cfg.lora_dropout,
            target_modules=model_cfg.target_modules or DEFAULT_TARGETS,
            exclude_modules=model_cfg.exclude_modules,
            init=model_cfg.init_lora_weights,
            use_rslora=model_cfg.use_rslora,
            generator=generator,
        )
        _cast_adapters(model, model_cfg.adapter_dtype)
    else:
        adapter = adapter or read_adapter(model_cfg.lora_path)
        apply_and_load_adapter(model, adapter, expected_rank=model_cfg.lora_rank)
        if _cast_adapters(model, model_cfg.adapter_dtype):
            load_adapter(model, adapter)  # again, at the adapters' new precision
    mark_only_lora_trainable(model)
    return model


def _cast_adapters(model: nn.Module, dtype_name: str) -> bool:
    """Casts every `lora_A` / `lora_B` to `dtype_name`; True when any changed dtype."""
    dtype = getattr(torch, dtype_name)
    changed = False
    for _, layer in iter_lora_layers(model):
        for module in (layer.lora_A, layer.lora_B):
            changed |= module.weight.dtype != dtype
            module.to(dtype)
    return changed
