"""LoRA on any model: the layer, which modules are targets, patching, the PEFT format,
checkpoints, merging, weight sync and the reference-policy switch.

Modules, bottom up: `layer` (LoRALinear) <- `targets` (matching, the patched layers) <-
`merge` <- `inject` (apply_lora / remove_lora) <- `trainable`, `peft_format`, `weight_sync`,
`disable` <- `checkpoint` (save / validated load).
"""

from lora_runtime.adapters.checkpoint import (
    apply_and_load_adapter,
    check_adapter_rank,
    load_adapter,
    save_adapter,
)
from lora_runtime.adapters.disable import adapter_disabled
from lora_runtime.adapters.grouping import group_siblings, sibling_groups, ungroup_siblings
from lora_runtime.adapters.inject import apply_lora, remove_lora
from lora_runtime.adapters.layer import LoRALinear
from lora_runtime.adapters.merge import MergeStats, merge_lora, merged, merged_weight
from lora_runtime.adapters.peft_format import AdapterFiles, read_adapter, read_adapter_config
from lora_runtime.adapters.saved_modules import PEFT_PREFIX, mark_modules_to_save, modules_to_save
from lora_runtime.adapters.targets import (
    DEFAULT_TARGETS,
    find_targets,
    iter_lora_layers,
    unwrap_model,
)
from lora_runtime.adapters.trainable import (
    TrainableSummary,
    mark_only_lora_trainable,
    trainable_summary,
)
from lora_runtime.adapters.weight_sync import adapter_state_dict, iter_merged_weights
from lora_runtime.errors import AdapterError, MergeError

__all__ = [
    "DEFAULT_TARGETS",
    "PEFT_PREFIX",
    "AdapterError",
    "AdapterFiles",
    "LoRALinear",
    "MergeError",
    "MergeStats",
    "TrainableSummary",
    "adapter_disabled",
    "adapter_state_dict",
    "apply_and_load_adapter",
    "apply_lora",
    "check_adapter_rank",
    "find_targets",
    "group_siblings",
    "iter_lora_layers",
    "iter_merged_weights",
    "load_adapter",
    "mark_modules_to_save",
    "mark_only_lora_trainable",
    "merge_lora",
    "merged",
    "merged_weight",
    "modules_to_save",
    "read_adapter",
    "read_adapter_config",
    "remove_lora",
    "save_adapter",
    "sibling_groups",
    "trainable_summary",
    "ungroup_siblings",
    "unwrap_model",
]
