"""lora-runtime: fused, compile-friendly LoRA for RL actors, in PEFT's adapter format.

Data flows one way: YAML -> `config` -> `actor.prepare_actor` -> `adapters` ->
`LoRALinear` -> `ops.lora_linear` -> the C++ op in `csrc/`.

The public names are the imports of the `if TYPE_CHECKING:` block below, the one list:
type checkers and IDEs read them there, and `_public_names` reads the same block to build
`__all__` and load each name on first use (PEP 562), so `import lora_runtime.config`
stays free of torch and a command's `--help` does not load the extension.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # the public names (`X as X`: an explicit re-export); never executed
    from lora_runtime.actor import prepare_actor as prepare_actor
    from lora_runtime.adapters import LoRALinear as LoRALinear
    from lora_runtime.adapters import MergeStats as MergeStats
    from lora_runtime.adapters import TrainableSummary as TrainableSummary
    from lora_runtime.adapters import adapter_disabled as adapter_disabled
    from lora_runtime.adapters import adapter_state_dict as adapter_state_dict
    from lora_runtime.adapters import apply_and_load_adapter as apply_and_load_adapter
    from lora_runtime.adapters import apply_lora as apply_lora
    from lora_runtime.adapters import iter_lora_layers as iter_lora_layers
    from lora_runtime.adapters import iter_merged_weights as iter_merged_weights
    from lora_runtime.adapters import load_adapter as load_adapter
    from lora_runtime.adapters import merge_lora as merge_lora
    from lora_runtime.adapters import merged as merged
    from lora_runtime.adapters import merged_weight as merged_weight
    from lora_runtime.adapters import read_adapter_config as read_adapter_config
    from lora_runtime.adapters import remove_lora as remove_lora
    from lora_runtime.adapters import save_adapter as save_adapter
    from lora_runtime.adapters import trainable_summary as trainable_summary
    from lora_runtime.compile import compile_actor as compile_actor
    from lora_runtime.config import DEFAULT_TARGETS as DEFAULT_TARGETS
    from lora_runtime.config import ActorModelConfig as ActorModelConfig
    from lora_runtime.config import RunConfig as RunConfig
    from lora_runtime.config import load_config as load_config
    from lora_runtime.errors import AdapterError as AdapterError
    from lora_runtime.errors import ConfigError as ConfigError
    from lora_runtime.errors import MergeError as MergeError
    from lora_runtime.errors import UsageError as UsageError
    from lora_runtime.ops import extension_loaded as extension_loaded
    from lora_runtime.ops import lora_linear as lora_linear
    from lora_runtime.parallel import replicate_actor as replicate_actor
    from lora_runtime.parallel import shard_actor as shard_actor


def _public_names() -> dict[str, str]:
    """`{public name: the module that defines it}`, read from the block above."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    (block,) = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    return {alias.asname or alias.name: node.module for node in block.body for alias in node.names}


_EXPORTS = _public_names()
__all__ = [name for name in sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
