"""HF PEFT's adapter format: file names, keys, `adapter_config.json`, validated reading.

A folder holds `adapter_config.json` and `adapter_model.safetensors`, whose keys are
`base_model.model.<module path>.lora_A.weight` (`[r, in]`) and `.lora_B.weight` (`[out, r]`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lora_runtime._fs import read_json_object
from lora_runtime.adapters.targets import inside_any, iter_lora_layers, matches_target, unwrap_model
from lora_runtime.errors import AdapterError

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "PEFT_PREFIX",
    "AdapterError",
    "AdapterFiles",
    "adapter_config_dict",
    "read_adapter",
    "read_adapter_config",
    "read_adapter_weights",
]

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# `<prefix?><path>.lora_A[.<adapter name>].weight`; PEFT drops the name "default" on save.
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


# ----------------------------------------------------------------------------- writing


def _target_modules(model: nn.Module, patched: list[str]) -> list[str] | str:
    """Leaf names of the patched modules, or an exact-path regex when leaf names over-match."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in patched})
    patched_set = set(patched)
    over = [
        n for n, m in unwrap_model(model).named_modules()
        if isinstance(m, nn.Linear) and matches_target(n, leaves) and not inside_any(n, patched_set)
    ]
    if not over:
        return leaves
    return "^(" + "|".join(re.escape(p) for p in patched) + ")$"  # PEFT: re.fullmatch


def _task_type(model: nn.Module) -> str | None:
    """PEFT's `task_type`: "CAUSAL_LM" for a transformers `...ForCausalLM`, else None."""
    return "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None


def adapter_config_dict(model: nn.Module) -> dict[str, Any]:
    """The `adapter_config.json` content describing the model's adapters.

    `base_model_name_or_path` is the model's `name_or_path` (the folder as given to
    `from_pretrained`, or the built-in actor's base folder) and `task_type` is "CAUSAL_LM"
    for a causal LM, so that PEFT's `AutoPeftModelForCausalLM` can load the folder.

    Raises:
        AdapterError: no LoRA layers, or layers with different r / alpha / dropout / rsLoRA.
    """
    layers = list(iter_lora_layers(model))
    if not layers:
        raise AdapterError("save_adapter: the model has no LoRA layers (was apply_lora called?)")
    first = layers[0][1]
    spec = (first.r, first.lora_alpha, first.lora_dropout, first.use_rslora)
    odd = [p for p, layer in layers if (layer.r, layer.lora_alpha, layer.lora_dropout, layer.use_rslora) != spec]
    if odd:
        raise AdapterError(
            f"save_adapter: layers differ in r/lora_alpha/lora_dropout/use_rslora from "
            f"'{layers[0][0]}' (r={first.r}, alpha={first.lora_alpha:g}): {odd[:5]}"
        )
    alpha = first.lora_alpha
    inner = unwrap_model(model)
    return {
        "peft_type": "LORA",
        "task_type": _task_type(inner),
        "base_model_name_or_path": getattr(inner, "name_or_path", None) or None,
        "r": first.r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": first.lora_dropout,
        "target_modules": _target_modules(model, [p for p, _ in layers]),
        "bias": "none",
        "use_rslora": first.use_rslora,
        "init_lora_weights": "gaussian" if first.init == "gaussian" else True,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter folder read and checked once: its config and its weights by module path."""

    directory: str
    config: dict[str, Any]
    layers: dict[str, dict[str, torch.Tensor]]  # {path: {"lora_A": [r, in], "lora_B": [out, r]}}


def read_adapter(directory: str | os.PathLike) -> AdapterFiles:
    """Reads `adapter_config.json` and the weights, checking both (see the two readers).

    Raises:
        AdapterError: anything wrong with the folder, the config or the weights file.
    """
    directory = os.fspath(directory)
    config = read_adapter_config(directory)
    return AdapterFiles(directory, config, read_adapter_weights(directory))


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks `adapter_config.json`.

    Returns:
        The parsed config (`r`, `lora_alpha`, `target_modules`, ...).

    Raises:
        AdapterError: missing folder or file, bad JSON, or values this runtime cannot load
            (the message names the file and the key).
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    if not os.path.isdir(directory):
        raise AdapterError(f"adapter folder {directory} does not exist (expected {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME} in it)")
    try:
        cfg = read_json_object(path)
    except FileNotFoundError:
        raise AdapterError(f"{path}: missing; {directory} is not a PEFT/lora-runtime adapter folder") from None
    except ValueError as exc:  # not JSON, or not an object: the message names the file
        raise AdapterError(str(exc)) from None
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type={cfg.get('peft_type')!r} (only 'LORA' is supported)")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        problems.append(f"r={r!r} (an integer >= 1 is required)")
    alpha = cfg.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0 or not math.isfinite(alpha):
        problems.append(f"lora_alpha={alpha!r} (a number > 0 is required)")
    dropout = cfg.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        problems.append(f"lora_dropout={dropout!r} (0 <= p < 1 is required)")
    targets = cfg.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))):
        problems.append(f"target_modules={targets!r} (a non-empty list of names or a regex string is required)")
    for key, ok in (("fan_in_fan_out", False), ("use_dora", False)):
        if cfg.get(key, ok) not in (ok, None):
            problems.append(f"{key}={cfg.get(key)!r} (not supported; must be {ok})")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if cfg.get(key):
            problems.append(f"{key}={cfg.get(key)!r} (not supported; must be empty)")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg.get('bias')!r} (only 'none' is supported)")
    if problems:
        raise AdapterError(f"{path}: cannot load this adapter:\n  " + "\n  ".join(problems))
    return cfg


def read_adapter_weights(directory: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """`{module path: {"lora_A": tensor, "lora_B": tensor}}` from the safetensors file.

    Raises:
        AdapterError: a missing, unreadable or truncated file, or keys that are not LoRA
            A/B weights (the message names the file and the keys).
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise AdapterError(f"{path}: missing; the adapter folder has no weights file")
    try:
        raw = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from None
    layers: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for key, tensor in raw.items():
        m = _KEY.match(key)
        if m is None:
            bad.append(key)
            continue
        layers.setdefault(m["path"], {})[m["kind"]] = tensor
    if bad:
        raise AdapterError(
            f"{path}: unexpected keys (only '<path>.lora_A.weight' / '<path>.lora_B.weight' "
            f"are supported): {bad[:8]}" + (f" ... ({len(bad)} in all)" if len(bad) > 8 else "")
        )
    return layers
