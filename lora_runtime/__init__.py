"""lora-runtime: fused, compile-friendly LoRA for RL actors, in PEFT's adapter format.

Data flows one way: YAML -> `config` -> `actor.prepare_actor` -> `adapters` ->
`LoRALinear` -> `ops.lora_linear` -> the C++ op in `csrc/`.

The names below load on first use (PEP 562), so `import lora_runtime.config` stays free
of torch and a command's `--help` does not load the extension.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "DEFAULT_TARGETS": "lora_runtime.config",
    "ActorModelConfig": "lora_runtime.config",
    "ConfigError": "lora_runtime.config",
    "RunConfig": "lora_runtime.config",
    "load_config": "lora_runtime.config",
    "extension_loaded": "lora_runtime.ops",
    "lora_linear": "lora_runtime.ops",
    "AdapterError": "lora_runtime.adapters",
    "LoRALinear": "lora_runtime.adapters",
    "MergeError": "lora_runtime.adapters",
    "MergeStats": "lora_runtime.adapters",
    "TrainableSummary": "lora_runtime.adapters",
    "adapter_disabled": "lora_runtime.adapters",
    "adapter_state_dict": "lora_runtime.adapters",
    "apply_and_load_adapter": "lora_runtime.adapters",
    "apply_lora": "lora_runtime.adapters",
    "iter_lora_layers": "lora_runtime.adapters",
    "iter_merged_weights": "lora_runtime.adapters",
    "load_adapter": "lora_runtime.adapters",
    "merge_lora": "lora_runtime.adapters",
    "merged": "lora_runtime.adapters",
    "merged_weight": "lora_runtime.adapters",
    "read_adapter_config": "lora_runtime.adapters",
    "remove_lora": "lora_runtime.adapters",
    "save_adapter": "lora_runtime.adapters",
    "trainable_summary": "lora_runtime.adapters",
    "prepare_actor": "lora_runtime.actor",
    "compile_actor": "lora_runtime.compile",
    "replicate_actor": "lora_runtime.parallel",
    "shard_actor": "lora_runtime.parallel",
}

__all__ = [
    "DEFAULT_TARGETS",
    "ActorModelConfig",
    "AdapterError",
    "ConfigError",
    "LoRALinear",
    "MergeError",
    "MergeStats",
    "RunConfig",
    "TrainableSummary",
    "adapter_disabled",
    "adapter_state_dict",
    "apply_and_load_adapter",
    "apply_lora",
    "compile_actor",
    "extension_loaded",
    "iter_lora_layers",
    "iter_merged_weights",
    "load_adapter",
    "load_config",
    "lora_linear",
    "merge_lora",
    "merged",
    "merged_weight",
    "prepare_actor",
    "read_adapter_config",
    "remove_lora",
    "replicate_actor",
    "save_adapter",
    "shard_actor",
    "trainable_summary",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from lora_runtime.actor import prepare_actor
    from lora_runtime.adapters import (
        AdapterError,
        LoRALinear,
        MergeError,
        MergeStats,
        TrainableSummary,
        adapter_disabled,
        adapter_state_dict,
        apply_and_load_adapter,
        apply_lora,
        iter_lora_layers,
        iter_merged_weights,
        load_adapter,
        merge_lora,
        merged,
        merged_weight,
        read_adapter_config,
        remove_lora,
        save_adapter,
        trainable_summary,
    )
    from lora_runtime.compile import compile_actor
    from lora_runtime.config import (
        DEFAULT_TARGETS,
        ActorModelConfig,
        ConfigError,
        RunConfig,
        load_config,
    )
    from lora_runtime.ops import extension_loaded, lora_linear
    from lora_runtime.parallel import replicate_actor, shard_actor
