"""The RL job's actor: its base (built-in or a model folder) in the mode of `actor.model`.

`build_actor(run_cfg) -> model` checks the task, reads a resumed adapter before anything
slow, loads the base (`builtin_base.load_base`), checks the task fits the model, applies
`prepare_actor` and groups the LoRA layers that share an input.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lora_runtime.actor import prepare_actor
from lora_runtime.adapters import (
    AdapterError,
    check_adapter_rank,
    group_siblings,
    read_adapter,
    unwrap_model,
)
from lora_runtime.config import ConfigError, RunConfig
from lora_runtime.rl.builtin_base import check_task, load_base
from lora_runtime.rl.models import family_of
from lora_runtime.rl.seeding import RunSeeds
from lora_runtime.rl.tasks import build_task


def build_actor(run_cfg: RunConfig, create_base: bool = True, log: Callable[[str], None] = print,
                cache_base: bool = True) -> nn.Module:
    """Loads the base and applies the mode of `actor.model` with `prepare_actor`.

    New adapters are drawn from the "adapter_init" stream of `runner.seed` (`RunSeeds`).
    `create_base` and `cache_base` are `load_base`'s `create` and `cache` (only `train`
    writes a built-in base; other commands build a missing one in memory).

    Returns:
        The actor: patched with trainable adapters (new / resume) or fully trainable (full).

    Raises:
        ConfigError: bad `model_path`, or a task that does not fit the model.
        AdapterError: resume mode with a missing, corrupt or mismatching adapter (the message
            names `actor.model.lora_path`).
    """
    mc = run_cfg.actor.model
    check_task(run_cfg)
    adapter = None
    if mc.mode == "resume":  # a bad adapter fails before the base is loaded or built
        try:
            adapter = read_adapter(mc.lora_path)
        except AdapterError as exc:
            raise AdapterError(
                f"actor.model.lora_path={mc.lora_path!r}: {exc}. Point lora_path at the adapter/ folder "
                "a LoRA run saved (adapter_config.json + adapter_model.safetensors; e.g. train "
                "configs/lora_new.yaml first), or set lora_path: null to train a new adapter"
            ) from None
        check_adapter_rank(adapter, mc.lora_rank)  # before the base is built, too
    try:
        model = load_base(run_cfg, create=create_base, log=log, cache=cache_base)
        build_task(run_cfg, model)  # fail early on a task that does not fit the model
        generator = RunSeeds(run_cfg.runner.seed).generator("adapter_init")
        model = prepare_actor(model, mc, adapter=adapter, generator=generator)
        if mc.group_siblings and mc.mode != "full":
            group_actor_siblings(run_cfg, model)
        return model
    except AdapterError as exc:  # the adapter does not fit this model (rank, targets, shapes)
        raise AdapterError(f"actor.model.lora_path={mc.lora_path!r}: {exc}") from None
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"actor.model: {exc}") from None


def group_actor_siblings(run_cfg: RunConfig, model: nn.Module) -> list[list[str]]:
    """Groups the actor's LoRA layers that share an input, from one forward on the task's
    example inputs."""
    device = next(unwrap_model(model).parameters()).device
    family = family_of(model)
    inputs = build_task(run_cfg, model).example_inputs().to(device)
    return group_siblings(model, run=lambda m: family.logits(m, inputs))
