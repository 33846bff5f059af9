"""Adapters on disk: `save_adapter` (atomic, rank 0 writes) and validated loading.

Loading checks everything (config, keys, shapes, dtypes, finiteness, r / alpha / rsLoRA)
before any weight is touched, so a refused adapter leaves the model as it was.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from torch import nn

from lora_runtime import _dist
from lora_runtime._fs import atomic_dir
from lora_runtime.adapters.inject import apply_lora, remove_lora
from lora_runtime.adapters.layer import INIT_METHODS, LoRALinear
from lora_runtime.adapters.peft_format import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterError,
    AdapterFiles,
    adapter_config_dict,
    read_adapter,
)
from lora_runtime.adapters.saved_modules import (
    check_saved_modules,
    load_saved_modules,
    saved_module_tensors,
)
from lora_runtime.adapters.targets import find_targets, iter_lora_layers
from lora_runtime.adapters.weight_sync import adapter_state_dict

__all__ = ["apply_and_load_adapter", "check_adapter_rank", "load_adapter", "save_adapter"]


def check_adapter_rank(adapter: AdapterFiles, expected_rank: int) -> None:
    """Refuses an adapter whose r is not the run config's `lora_rank` (reads no weights).

    Raises:
        AdapterError: naming both values and the fix.
    """
    r = adapter.config["r"]
    if r != expected_rank:
        raise AdapterError(
            f"actor.model.lora_rank={expected_rank} but the adapter in {adapter.directory} has r={r} "
            f"({ADAPTER_CONFIG_NAME}); set lora_rank: {r} to resume it"
        )


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Writes the model's adapters to `directory` in PEFT's layout, atomically.

    The new folder is written and synced beside `directory`, then swapped in with one
    atomic rename (an exchange when `directory` already exists), so a process killed at any
    moment leaves `directory` holding either the previous complete adapter or the new one.

    Args:
        model: a patched model (compiled / DDP wrappers are unwrapped; FSDP2 shards are
            gathered). In a process group every rank must call this (a collective):
            rank 0 alone writes, and all ranks return once the files exist.
        directory: the adapter folder; created (with parents) if missing.

    Raises:
        AdapterError: nothing to save, `directory` is a file, or it cannot be written.
    """
    directory = os.path.abspath(os.fspath(directory))
    config = adapter_config_dict(model)
    tensors = {k: v.detach().to("cpu").contiguous()
               for k, v in {**adapter_state_dict(model), **saved_module_tensors(model)}.items()}
    if not _dist.is_main_process():  # rank 0 alone writes; the others wait for it
        _dist.barrier()
        return
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise AdapterError(f"save_adapter: {directory} exists and is not a directory")
    try:
        with atomic_dir(directory) as staging:
            save_file(tensors, os.path.join(staging, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
            with open(os.path.join(staging, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")
    except OSError as exc:
        raise AdapterError(f"save_adapter: writing {directory} failed: {exc}") from None
    _dist.barrier()


def _check_weights(
    path: str, layers: dict[str, dict[str, torch.Tensor]], model: nn.Module, r: int
) -> list[str]:
    problems = []
    live = dict(iter_lora_layers(model))
    missing = sorted(set(live) - set(layers))
    unexpected = sorted(set(layers) - set(live))
    if missing:
        problems.append(f"missing adapter weights for {len(missing)} module(s): {missing[:6]}")
    if unexpected:
        problems.append(f"weights for {len(unexpected)} module(s) the model does not adapt: {unexpected[:6]}")
    for name in sorted(set(live) & set(layers)):
        layer: LoRALinear = live[name]
        want = {"lora_A": (r, layer.in_features), "lora_B": (layer.out_features, r)}
        for kind, shape in want.items():
            t = layers[name].get(kind)
            if t is None:
                problems.append(f"{name}.{kind}.weight is missing")
            elif tuple(t.shape) != shape:
                problems.append(f"{name}.{kind}.weight has shape {list(t.shape)}, expected {list(shape)}")
            elif not t.is_floating_point():
                problems.append(f"{name}.{kind}.weight has dtype {t.dtype}, expected floating point")
            elif not torch.isfinite(t).all():
                problems.append(f"{name}.{kind}.weight has non-finite values")
        if layer.r != r:
            problems.append(f"{name}: model layer has r={layer.r}, adapter r={r}")
    return problems


def load_adapter(model: nn.Module, directory: str | os.PathLike | AdapterFiles) -> None:
    """Copies a saved adapter (ours or PEFT's) into an already patched model.

    Everything is checked before any weight is touched: config values, a readable
    safetensors file, missing / unexpected keys, shapes, non-finite values, and that the
    model's layers have the adapter's r and scaling.

    Raises:
        AdapterError: one message listing every problem; the model is unchanged.
    """
    _load_checked(model, directory if isinstance(directory, AdapterFiles) else read_adapter(directory))


def _load_checked(model: nn.Module, adapter: AdapterFiles) -> None:
    cfg, layers = adapter.config, adapter.layers
    weights_path = os.path.join(adapter.directory, ADAPTER_WEIGHTS_NAME)
    problems = _check_weights(weights_path, layers, model, cfg["r"]) + check_saved_modules(model, adapter.modules)
    alpha, rslora = float(cfg.get("lora_alpha", cfg["r"])), bool(cfg.get("use_rslora", False))
    for name, layer in iter_lora_layers(model):
        if (layer.lora_alpha, layer.use_rslora) != (alpha, rslora) and name in layers:
            problems.append(
                f"{name}: model layer has lora_alpha={layer.lora_alpha:g}, use_rslora={layer.use_rslora}; "
                f"adapter has lora_alpha={alpha:g}, use_rslora={rslora}"
            )
            break
    if problems:
        raise AdapterError(
            f"{weights_path}: cannot load into this model (nothing was changed):\n  " + "\n  ".join(problems)
        )
    _dist.reshard(model)  # FSDP2: write the shards, not gathered copies
    for name, layer in iter_lora_layers(model):  # each rank keeps its slice of a shard
        _dist.copy_full_(layer.lora_A.weight, layers[name]["lora_A"])
        _dist.copy_full_(layer.lora_B.weight, layers[name]["lora_B"])
    load_saved_modules(model, adapter.modules)


def apply_and_load_adapter(
    model: nn.Module, adapter: str | os.PathLike | AdapterFiles, expected_rank: int | None = None
) -> nn.Module:
    """Patches an unpatched model as the adapter's config says, then loads its weights.

    r, lora_alpha, lora_dropout, use_rslora and target_modules come from
    `adapter_config.json` (as in PEFT).

    Args:
        model: the base model, not yet patched.
        adapter: the adapter folder, or the folder already read with `read_adapter`
            (each file is read once either way).
        expected_rank: the run config's `lora_rank`; an adapter with another r is refused.

    Returns:
        `model`, patched and loaded.

    Raises:
        AdapterError: anything wrong with the folder or a rank mismatch; the model is left
            unpatched and unchanged.
    """
    if not isinstance(adapter, AdapterFiles):
        adapter = read_adapter(adapter)
    directory, cfg = adapter.directory, adapter.config
    if expected_rank is not None:
        check_adapter_rank(adapter, expected_rank)
    exclude = cfg.get("exclude_modules") or []
    paths = [n for n, _ in find_targets(model, cfg["target_modules"], exclude)]
    if not paths:
        raise AdapterError(
            f"{os.path.join(directory, ADAPTER_CONFIG_NAME)}: target_modules="
            f"{cfg['target_modules']!r} matches no nn.Linear module of this model"
        )
    init = cfg.get("init_lora_weights")
    try:
        apply_lora(
            model,
            rank=cfg["r"],
            alpha=float(cfg.get("lora_alpha", cfg["r"])),
            dropout=float(cfg.get("lora_dropout", 0.0)),
            target_modules=paths,
            init=init if init in INIT_METHODS else "kaiming",
            use_rslora=bool(cfg.get("use_rslora", False)),
        )
    except ValueError as exc:
        raise AdapterError(f"{directory}: {exc}") from None
    try:
        _load_checked(model, adapter)
    except Exception:
        remove_lora(model, merge=False)
        raise
    return model
