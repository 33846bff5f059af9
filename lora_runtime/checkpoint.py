"""Adapters on disk in HF PEFT's layout, saved atomically and loaded only after validation.

A folder holds `adapter_config.json` and `adapter_model.safetensors`, whose keys are
`base_model.model.<module path>.lora_A.weight` (`[r, in]`) and `.lora_B.weight` (`[out, r]`).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lora_runtime import distributed
from lora_runtime.layer import INIT_METHODS, LoRALinear
from lora_runtime.registry import (
    apply_lora,
    iter_lora_layers,
    matches_target,
    remove_lora,
    unwrap_model,
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "PEFT_PREFIX",
    "AdapterError",
    "adapter_config_dict",
    "adapter_state_dict",
    "apply_and_load_adapter",
    "load_adapter",
    "read_adapter_config",
    "save_adapter",
]

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# `<prefix?><path>.lora_A[.<adapter name>].weight`; PEFT drops the name "default" on save.
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter folder that cannot be saved or loaded; the message says what and where."""


# ----------------------------------------------------------------------------- saving


def _to_cpu_full(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)  # a DTensor shard (FSDP2) -> the whole tensor
    t = full() if callable(full) else t
    return t.detach().to("cpu").contiguous()


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, under PEFT's keys, as stored in `adapter_model.safetensors`.

    Args:
        model: a patched model (a compiled or DDP-wrapped one is unwrapped).

    Returns:
        `{"base_model.model.<path>.lora_A.weight": [r, in], "...lora_B.weight": [out, r]}`,
        detached views of the live parameters (no copy) for ordinary tensors.
    """
    out: dict[str, torch.Tensor] = {}
    for path, layer in iter_lora_layers(model):  # full_tensor gathers FSDP2 shards
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = distributed.full_tensor(layer.lora_A.weight.detach())
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = distributed.full_tensor(layer.lora_B.weight.detach())
    return out


def _target_modules(model: nn.Module, patched: list[str]) -> list[str] | str:
    """Leaf names of the patched modules, or an exact-path regex when leaf names over-match."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in patched})
    patched_set = set(patched)
    over = [
        n for n, m in unwrap_model(model).named_modules()
        if isinstance(m, nn.Linear) and n not in patched_set and matches_target(n, leaves)
        and not any(n.startswith(p + ".") for p in patched_set)
    ]
    if not over:
        return leaves
    return "^(" + "|".join(re.escape(p) for p in patched) + ")$"  # PEFT: re.fullmatch


def adapter_config_dict(model: nn.Module) -> dict[str, Any]:
    """The `adapter_config.json` content describing the model's adapters.

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
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
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


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the filesystem cannot exchange
        return False
    raise OSError(err, os.strerror(err), b)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    tensors = {k: _to_cpu_full(v) for k, v in adapter_state_dict(model).items()}
    if not distributed.is_main_process():  # rank 0 alone writes; the others wait for it
        distributed.barrier()
        return
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise AdapterError(f"save_adapter: {directory} exists and is not a directory")
    parent = os.path.dirname(directory)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.saving-", dir=parent)
    except OSError as exc:
        raise AdapterError(f"save_adapter: cannot write under {parent}: {exc.strerror}") from None
    try:
        weights = os.path.join(staging, ADAPTER_WEIGHTS_NAME)
        save_file(tensors, weights, metadata={"format": "pt"})
        with open(os.path.join(staging, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
            with open(os.path.join(staging, name), "rb") as f:
                os.fsync(f.fileno())
        os.chmod(staging, 0o755)
        _fsync_dir(staging)
        if not os.path.exists(directory):
            os.rename(staging, directory)
            staging = None
        elif _exchange(staging, directory):
            pass  # staging now holds the previous adapter; removed below
        else:  # no atomic exchange here: replace file by file (each replace is atomic)
            for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
                os.replace(os.path.join(staging, name), os.path.join(directory, name))
        _fsync_dir(parent)
    except OSError as exc:
        raise AdapterError(f"save_adapter: writing {directory} failed: {exc}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    distributed.barrier()


# ----------------------------------------------------------------------------- loading


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
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise AdapterError(f"{path}: missing; {directory} is not a PEFT/lora-runtime adapter folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
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


def _read_weights(directory: str) -> dict[str, dict[str, torch.Tensor]]:
    """`{module path: {"lora_A": tensor, "lora_B": tensor}}` from the safetensors file."""
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


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Copies a saved adapter (ours or PEFT's) into an already patched model.

    Everything is checked before any weight is touched: config values, a readable
    safetensors file, missing / unexpected keys, shapes, non-finite values, and that the
    model's layers have the adapter's r and scaling.

    Raises:
        AdapterError: one message listing every problem; the model is unchanged.
    """
    directory = os.fspath(directory)
    cfg = read_adapter_config(directory)
    layers = _read_weights(directory)
    problems = _check_weights(os.path.join(directory, ADAPTER_WEIGHTS_NAME), layers, model, cfg["r"])
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
            f"{os.path.join(directory, ADAPTER_WEIGHTS_NAME)}: cannot load into this model "
            "(nothing was changed):\n  " + "\n  ".join(problems)
        )
    distributed.reshard(model)  # FSDP2: write the shards, not gathered copies
    for name, layer in iter_lora_layers(model):  # each rank keeps its slice of a shard
        distributed.copy_full_(layer.lora_A.weight, layers[name]["lora_A"])
        distributed.copy_full_(layer.lora_B.weight, layers[name]["lora_B"])


def _target_predicate(targets: list[str] | str) -> Callable[[str], bool]:
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return lambda name: pattern.fullmatch(name) is not None
    return lambda name: matches_target(name, targets)


def apply_and_load_adapter(
    model: nn.Module, directory: str | os.PathLike, expected_rank: int | None = None
) -> nn.Module:
    """Patches an unpatched model as the adapter's config says, then loads its weights.

    r, lora_alpha, lora_dropout, use_rslora and target_modules come from
    `adapter_config.json` (as in PEFT).

    Args:
        model: the base model, not yet patched.
        directory: the adapter folder.
        expected_rank: the run config's `lora_rank`; an adapter with another r is refused.

    Returns:
        `model`, patched and loaded.

    Raises:
        AdapterError: anything wrong with the folder or a rank mismatch; the model is left
            unpatched and unchanged.
    """
    directory = os.fspath(directory)
    cfg = read_adapter_config(directory)
    if expected_rank is not None and cfg["r"] != expected_rank:
        raise AdapterError(
            f"actor.model.lora_rank={expected_rank} but the adapter in {directory} has r={cfg['r']} "
            f"({ADAPTER_CONFIG_NAME}); set lora_rank: {cfg['r']} to resume it"
        )
    _read_weights(directory)  # fail on a corrupt file before patching anything
    wanted = _target_predicate(cfg["target_modules"])
    exclude = cfg.get("exclude_modules") or []
    paths = [
        n for n, m in unwrap_model(model).named_modules()
        if n and isinstance(m, nn.Linear) and wanted(n) and not matches_target(n, exclude)
    ]
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
        load_adapter(model, directory)
    except Exception:
        remove_lora(model, merge=False)
        raise
    return model
