"""Model folders in Hugging Face layout (`config.json` plus `*.safetensors`): the checks and
files every family shares. Which family reads or writes a folder is `registry`'s business
(`load_model_folder`, `save_model_folder`).
"""

from __future__ import annotations

import fnmatch
import glob
import os
import shutil
from typing import Any

import torch

from lora_runtime._fs import read_json_object
from lora_runtime.config import ConfigError

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


def copy_serving_files(source: str | None, staging: str) -> None:
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
