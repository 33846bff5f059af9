"""lora-runtime: fused, compile-friendly LoRA for RL actors, in PEFT's adapter format.

Data flows one way: YAML -> `config` -> `prepare_actor` -> `registry` -> `LoRALinear` ->
`ops.lora_linear` -> the C++ op in `csrc/`.
"""

from lora_runtime._extension import extension_loaded
from lora_runtime.checkpoint import (
    AdapterError,
    adapter_state_dict,
    apply_and_load_adapter,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from lora_runtime.compile import adapter_disabled, compile_actor
from lora_runtime.config import (
    DEFAULT_TARGETS,
    ActorModelConfig,
    ConfigError,
    RunConfig,
    load_config,
)
from lora_runtime.layer import LoRALinear
from lora_runtime.merge import MergeError, MergeStats, merge_lora, merged, merged_weight
from lora_runtime.ops import lora_linear
from lora_runtime.registry import (
    TrainableSummary,
    apply_lora,
    iter_lora_layers,
    prepare_actor,
    remove_lora,
    trainable_summary,
)
from lora_runtime.sync import iter_merged_weights

__version__ = "0.1.0"

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
    "save_adapter",
    "trainable_summary",
]
