"""Model folders in Hugging Face layout: `config.json` plus `*.safetensors`.

Two kinds are read and written:

- the built-in actor (`"model_type": "lora_runtime_vla"`): its sizes are in `config.json`
  under `"builtin"`, its weights in `model.safetensors`; no transformers needed;
- any other folder is handed to transformers (optional extra `lora-runtime[hf]`) as
  `AutoModelForCausalLM.from_pretrained(path, local_files_only=True)` (a vision-language
  model that is no causal LM, e.g. PaliGemma, with `AutoModelForImageTextToText`):
  nothing is downloaded.

Loading takes `actor.model.dtype` ("auto": the checkpoint's own). A model saved from a
folder (merged or full mode) gets the folder's tokenizer, processor, chat-template and
generation files beside its weights, so the result can be served as it is.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import shutil
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lora_runtime._fs import atomic_dir, read_json_object, write_json_atomic
from lora_runtime.config import BuiltinActorConfig, ConfigError
from lora_runtime.rl.models.vla import MODEL_TYPE, TinyVLA

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
KEY = "actor.model.model_path"
# Files of a model folder that are not carried to a saved copy (weights and the config).
_NOT_COPIED = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json",
               "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "adapter_*")


def torch_dtype(name: str) -> torch.dtype | None:
    """`actor.model.dtype` / `adapter_dtype` as a torch dtype; None for "auto"."""
    return None if name == "auto" else getattr(torch, name)


def read_model_folder(path: str, key: str = KEY) -> dict[str, Any]:
    """Checks that `path` is a model folder and returns its parsed `config.json`.

    Raises:
        ConfigError: missing folder, no `config.json`, bad JSON, or no safetensors weights;
            the message names `key`, the path and what to do.
    """
    fix = f"point {key} at a folder holding {CONFIG_NAME} and *.safetensors (Hugging Face layout), or set it to null for the built-in actor"
    if not os.path.exists(path):
        raise ConfigError(f"{key}={path!r} does not exist; {fix}")
    if not os.path.isdir(path):
        raise ConfigError(f"{key}={path!r} is a file, not a model folder; {fix}")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"{key}={path!r} has no {CONFIG_NAME}, so it is not a model folder; {fix}")
    try:
        cfg = read_json_object(cfg_path)
    except ValueError as exc:  # not JSON, or not an object: the message names the file
        raise ConfigError(f"{exc}; {fix}") from None
    if not glob.glob(os.path.join(path, "*.safetensors")):
        bins = glob.glob(os.path.join(path, "*.bin"))
        hint = " (it has PyTorch .bin files: re-save them with save_pretrained(..., safe_serialization=True))" if bins else ""
        raise ConfigError(f"{key}={path!r} has no *.safetensors weights{hint}; {fix}")
    return cfg


def load_model_folder(path: str, key: str = KEY, dtype: str = "auto") -> nn.Module:
    """Loads the model in `path` (built-in actor or a transformers causal LM), eval mode.

    Args:
        path: the model folder.
        key: what the messages call it.
        dtype: "auto" (the checkpoint's own dtype; the built-in actor's is float32),
            "float32", "bfloat16" or "float16".

    Raises:
        ConfigError: not a model folder, weights that do not fit the config, transformers
            missing or unable to load it.
    """
    cfg = read_model_folder(path, key)
    if cfg.get("model_type") == MODEL_TYPE:
        return _load_builtin(path, cfg, key).to(torch_dtype(dtype) or torch.float32)
    try:
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        raise ConfigError(
            f"{key}={path!r} is a transformers model (model_type={cfg.get('model_type')!r}) but "
            "transformers is not installed; install it with pip install 'lora-runtime[hf]'"
        ) from None
    causal = cfg.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    auto_class = AutoModelForCausalLM if causal else AutoModelForImageTextToText
    try:
        model = auto_class.from_pretrained(path, local_files_only=True, dtype=torch_dtype(dtype) or "auto")
    except Exception as exc:  # noqa: BLE001 (transformers raises many types for unusable folders)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{key}={path!r}: transformers could not load it as a causal language model "
            f"({type(exc).__name__}: {first}); point {key} at a causal LM checkpoint or the built-in actor"
        ) from None
    return model.eval()


def _load_builtin(path: str, cfg: dict[str, Any], key: str) -> TinyVLA:
    cfg_path = os.path.join(path, CONFIG_NAME)
    try:
        sizes = BuiltinActorConfig.model_validate(cfg.get("builtin", {}))
    except ValidationError as exc:
        raise ConfigError(f"{cfg_path}: the 'builtin' sizes are invalid: {exc}") from None
    weights = os.path.join(path, WEIGHTS_NAME)
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{weights}: cannot read the weights ({exc}); {key} must hold {WEIGHTS_NAME}") from None
    model = TinyVLA(sizes)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"{weights}: does not fit the sizes in {cfg_path}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {sorted(shapes)[:5]}"
        )
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.name_or_path = path  # as transformers models carry it (adapter_config.json names it)
    return model.eval()


def builtin_config_json(sizes: BuiltinActorConfig, **extra: Any) -> dict[str, Any]:
    """The `config.json` of a built-in actor folder."""
    return {
        "model_type": MODEL_TYPE,
        "architectures": [TinyVLA.__name__],
        "torch_dtype": "float32",
        "builtin": sizes.model_dump(),
        **extra,
    }


def save_model_folder(model: nn.Module, directory: str, **extra_config: Any) -> None:
    """Writes `model` to `directory` in Hugging Face layout, atomically.

    The built-in actor gets `config.json` (+ `extra_config` entries) and `model.safetensors`;
    a transformers model is written with `save_pretrained` (safetensors, `config.json` with
    the model's dtype, `generation_config.json`), then every other file of the folder it
    was loaded from (`model.name_or_path`: tokenizer, special tokens, chat template,
    processor) is copied beside it, unless `save_pretrained` wrote that name itself.

    Args:
        model: an unpatched model (merge or remove adapters first).
        directory: the target folder; an existing one is replaced only once the new one is
            complete.
    """
    with atomic_dir(directory) as staging:
        if isinstance(model, TinyVLA):
            state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
            save_file(state, os.path.join(staging, WEIGHTS_NAME), metadata={"format": "pt"})
            config = builtin_config_json(model.config, **extra_config)
            config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
            write_json_atomic(os.path.join(staging, CONFIG_NAME), config)
        else:
            model.save_pretrained(staging, safe_serialization=True)
            _copy_serving_files(getattr(model, "name_or_path", None), staging)


def _copy_serving_files(source: str | None, staging: str) -> None:
    """Copies the top-level files of `source` that are neither weights nor `config.json`
    (tokenizer, chat template, processor, generation config) into `staging`, keeping
    those `save_pretrained` already wrote."""
    if not source or not os.path.isdir(source):
        return
    for name in sorted(os.listdir(source)):
        src = os.path.join(source, name)
        skip = any(fnmatch.fnmatch(name, pattern) for pattern in _NOT_COPIED)
        if skip or not os.path.isfile(src) or os.path.exists(os.path.join(staging, name)):
            continue
        shutil.copy2(src, os.path.join(staging, name))
