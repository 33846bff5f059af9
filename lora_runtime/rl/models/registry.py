"""The model families, in the order they are asked, and the folder doors that use them.

`family_of(model)` is the one question the rest of the package asks about a model's class;
`load_model_folder` / `save_model_folder` read and write Hugging Face-layout folders through
the family that owns them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lora_runtime._fs import atomic_dir
from lora_runtime.adapters import unwrap_model
from lora_runtime.rl.models.causal_lm import CausalLMFamily
from lora_runtime.rl.models.family import ModelFamily
from lora_runtime.rl.models.folders import KEY, copy_serving_files, read_model_folder, torch_dtype
from lora_runtime.rl.models.vla_family import VLAFamily

FAMILIES: list[ModelFamily] = [VLAFamily(), CausalLMFamily()]  # first match wins


def family_of(model: nn.Module) -> ModelFamily:
    """The family of `model` (DDP/FSDP/compile wrappers are looked through).

    Raises:
        TypeError: no family reads this model (names the class and the families).
    """
    inner = unwrap_model(model)
    for family in FAMILIES:
        if family.matches(inner):
            return family
    names = ", ".join(f.name for f in FAMILIES)
    raise TypeError(f"{type(inner).__name__} is in no model family ({names}); see lora_runtime.rl.models")


def family_for_folder(config: dict[str, Any]) -> ModelFamily:
    """The family that reads a folder with this `config.json`."""
    return next(f for f in FAMILIES if f.reads_folder(config))


def load_model_folder(path: str, key: str = KEY, dtype: str = "auto") -> nn.Module:
    """Loads the model in `path` (built-in actor or a transformers model), in eval mode.

    Args:
        path: the model folder.
        key: what the messages call it.
        dtype: "auto" (the checkpoint's own dtype; the built-in actor's is float32),
            "float32", "bfloat16" or "float16".

    Raises:
        ConfigError: not a model folder, weights that do not fit the config, transformers
            missing or unable to load it.
    """
    config = read_model_folder(path, key)
    return family_for_folder(config).load_folder(path, config, key, torch_dtype(dtype)).eval()


def save_model_folder(model: nn.Module, directory: str, **extra_config: Any) -> None:
    """Writes `model` to `directory` in Hugging Face layout, atomically.

    The built-in actor gets `config.json` (+ `extra_config` entries) and `model.safetensors`;
    a transformers model is written with `save_pretrained`. Then every other file of the
    folder it was loaded from (`model.name_or_path`: tokenizer, special tokens, chat
    template, processor) is copied beside it, unless the family wrote that name itself.

    Args:
        model: an unpatched model (merge or remove adapters first).
        directory: the target folder; an existing one is replaced only once the new one is
            complete.
    """
    with atomic_dir(directory) as staging:
        family_of(model).save_weights(model, staging, extra_config)
        copy_serving_files(getattr(model, "name_or_path", None), staging)
