"""The built-in actor's base: where it is cached, how it is built once, how it is loaded.

With `actor.model.model_path: null` the actor is the built-in VLA (`rl.models.vla`). Its
deterministic base (seeded init + the task's warm start) is written once in Hugging Face
layout to `<base_dir>/tiny-vla-<hash of actor.builtin and the task's base recipe>/`, so
the new, resume and full runs all start from the same weights.

Where the base is (`builtin_base_dir`), first match:
1. `runner.base_dir`, when the config sets it;
2. the base an adapter was trained on, when the command is given one (`lora_path`, `eval
   --adapter`, `merge --adapter`): its `adapter_config.json` names it
   (`base_model_name_or_path`), and it is used when that folder still holds a complete base
   of the same recipe (the same `tiny-vla-<hash>` name);
3. `base/` beside `runner.output_dir` when the output path names a parent folder
   (`runs/run` -> `runs/base`), else `base/` inside it (`out` -> `out/base`, `.` -> `./base`):
   never outside the folders the config names.

Only `train` (and `demo`, through it) writes a base. `eval`, `merge` and `export` that find
none build it in memory (`cache=False` of `load_base`) and write nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lora_runtime.adapters import AdapterError, read_adapter_config
from lora_runtime.config import ConfigError, RunConfig
from lora_runtime.rl.models import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_model_folder,
    save_model_folder,
)
from lora_runtime.rl.models.folders import torch_dtype
from lora_runtime.rl.outputs import check_output_dir
from lora_runtime.rl.tasks import build_task, task_class

BASE_FORMAT = 3  # bump when the base recipe changes, so old cached bases are not reused


def _base_name(run_cfg: RunConfig) -> str:
    """`<prefix>-<hash of the base recipe>`: the folder name of this config's built-in base."""
    recipe = {"format": BASE_FORMAT, "builtin": run_cfg.actor.builtin.model_dump(), "task": run_cfg.task.base_recipe()}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return f"{task_class(run_cfg.task.kind).builtin_prefix}-{digest}"


def trained_on(adapter: str | None, name: str) -> str | None:
    """The base folder `adapter` was trained on, when its `adapter_config.json` names a
    complete built-in base called `name` (the same recipe); else None."""
    if adapter is None:
        return None
    try:
        recorded = read_adapter_config(adapter).get("base_model_name_or_path")
    except AdapterError:  # reported by whoever loads the adapter
        return None
    if not isinstance(recorded, str) or os.path.basename(os.path.normpath(recorded)) != name:
        return None
    return os.path.abspath(recorded) if _base_complete(recorded) else None


def builtin_base_dir(run_cfg: RunConfig, adapter: str | None = None) -> str:
    """Where the built-in base for this config lives (absolute; may not exist yet): see the
    module's docstring. `adapter` defaults to `actor.model.lora_path`."""
    name = _base_name(run_cfg)
    if run_cfg.runner.base_dir:
        return os.path.join(os.path.abspath(run_cfg.runner.base_dir), name)
    recorded = trained_on(adapter or run_cfg.actor.model.lora_path, name)
    if recorded is not None:
        return recorded
    out = os.path.normpath(run_cfg.runner.output_dir)
    parent = os.path.dirname(out)
    default = os.path.join(parent if parent not in ("", os.curdir) else out, "base")
    return os.path.join(os.path.abspath(default), name)


def base_path(run_cfg: RunConfig, adapter: str | None = None) -> str:
    """The folder the base weights come from: `model_path`, or the built-in base folder."""
    path = run_cfg.actor.model.model_path
    return os.path.abspath(path) if path is not None else builtin_base_dir(run_cfg, adapter)


def _base_complete(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, n)) for n in (CONFIG_NAME, WEIGHTS_NAME))


def _base_key(run_cfg: RunConfig) -> str:
    return "runner.base_dir" if run_cfg.runner.base_dir else "runner.output_dir"


def ensure_builtin_base(run_cfg: RunConfig, log: Callable[[str], None] = print) -> str:
    """Creates the built-in base folder unless it is already there; returns its path.

    Raises:
        ConfigError: the task does not fit the actor's sizes, or the folder cannot be written.
    """
    folder = builtin_base_dir(run_cfg)
    if _base_complete(folder):
        return folder
    check_output_dir(folder, overwrite=True, key=_base_key(run_cfg))  # before the warm start, not after
    model, report = _build(run_cfg, f"-> {folder}", log)
    try:
        save_model_folder(model, folder, task=run_cfg.task.model_dump(), pretrain=report)
    except OSError as exc:
        if _base_complete(folder):  # another process wrote it meanwhile
            return folder
        raise ConfigError(
            f"cannot write the built-in base to {folder} ({exc.strerror}); set {_base_key(run_cfg)} to a writable folder"
        ) from None
    return folder


def _build(run_cfg: RunConfig, where: str, log: Callable[[str], None]) -> tuple[nn.Module, dict[str, Any]]:
    """The built-in base's seeded init and warm start, in memory: (model, warm-start report)."""
    b = run_cfg.actor.builtin
    model = task_class(run_cfg.task.kind).builtin_model(run_cfg)
    log(f"building the built-in base actor (seed {b.seed}, {b.pretrain_steps} warm-start steps) {where}")
    return model, build_task(run_cfg, model).warm_start(model, run_cfg, log)


def load_base(run_cfg: RunConfig, create: bool = True, log: Callable[[str], None] = print,
              cache: bool = True, adapter: str | None = None) -> nn.Module:
    """The unpatched base model for `run_cfg`, in `actor.model.dtype`.

    Args:
        run_cfg: the validated run config.
        create: build the built-in base when missing; False returns the seeded initial
            weights instead (shapes and names only, for `inspect`).
        log: where progress lines go.
        cache: write a base built here to its folder (`train`); False builds it in memory
            and writes nothing (`eval`, `merge`, `export`).
        adapter: the adapter the base is for (default `actor.model.lora_path`): the base it
            was trained on is used when it is still there (see the module's docstring).

    Raises:
        ConfigError: a bad `model_path` or a base that cannot be written.
    """
    path, dtype = run_cfg.actor.model.model_path, run_cfg.actor.model.dtype
    if path is not None:
        return load_model_folder(path, dtype=dtype)
    folder = builtin_base_dir(run_cfg, adapter)
    if not _base_complete(folder):
        if not create:
            return task_class(run_cfg.task.kind).builtin_model(run_cfg).to(torch_dtype(dtype) or torch.float32)
        if not cache:
            model, _ = _build(run_cfg, f"in memory (not written: only `train` writes {folder})", log)
            model.name_or_path = folder  # as if loaded from there: what a saved adapter records
            return model.to(torch_dtype(dtype) or torch.float32).eval()
        ensure_builtin_base(run_cfg, log)
    return load_model_folder(folder, key=f"built-in base {folder}", dtype=dtype)


def base_report(run_cfg: RunConfig) -> dict[str, Any] | None:
    """The built-in base's warm-start report (`config.json`, key `pretrain`); None for a
    model folder or a base not built yet."""
    if run_cfg.actor.model.model_path is not None:
        return None
    path = os.path.join(builtin_base_dir(run_cfg), CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("pretrain", {})


def check_task(run_cfg: RunConfig) -> None:
    """The task's own checks before any work (levels, entry points, distribution)."""
    task_class(run_cfg.task.kind).check(run_cfg)
