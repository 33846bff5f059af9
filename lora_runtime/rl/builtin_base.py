"""The built-in actor's base: where it is cached, how it is built once, how it is loaded.

With `actor.model.model_path: null` the actor is the built-in VLA (`rl.models.vla`). Its
deterministic base (seeded init + the task's warm start) is written once in Hugging Face
layout to `<base_dir>/tiny-vla-<hash of actor.builtin and the task's base recipe>/`, so
the new, resume and full runs all start from the same weights. By default `base_dir` is
`base/` beside `runner.output_dir` when the output path names a parent folder
(`runs/run` -> `runs/base`), else `base/` inside it (`out` -> `out/base`, `.` -> `./base`):
never outside the folders the config names.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

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


def builtin_base_dir(run_cfg: RunConfig) -> str:
    """Where the built-in base for this config lives (absolute; may not exist yet)."""
    out = os.path.normpath(run_cfg.runner.output_dir)
    parent = os.path.dirname(out)
    default = os.path.join(parent if parent not in ("", os.curdir) else out, "base")
    root = run_cfg.runner.base_dir or default
    recipe = {"format": BASE_FORMAT, "builtin": run_cfg.actor.builtin.model_dump(), "task": run_cfg.task.base_recipe()}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(os.path.abspath(root), f"{task_class(run_cfg.task.kind).builtin_prefix}-{digest}")


def base_path(run_cfg: RunConfig) -> str:
    """The folder the base weights come from: `model_path`, or the built-in base folder."""
    path = run_cfg.actor.model.model_path
    return os.path.abspath(path) if path is not None else builtin_base_dir(run_cfg)


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
    b = run_cfg.actor.builtin
    model = task_class(run_cfg.task.kind).builtin_model(run_cfg)
    log(f"building the built-in base actor (seed {b.seed}, {b.pretrain_steps} warm-start steps) -> {folder}")
    report = build_task(run_cfg, model).warm_start(model, run_cfg, log)
    try:
        save_model_folder(model, folder, task=run_cfg.task.model_dump(), pretrain=report)
    except OSError as exc:
        if _base_complete(folder):  # another process wrote it meanwhile
            return folder
        raise ConfigError(
            f"cannot write the built-in base to {folder} ({exc.strerror}); set {_base_key(run_cfg)} to a writable folder"
        ) from None
    return folder


def load_base(run_cfg: RunConfig, create: bool = True, log: Callable[[str], None] = print) -> nn.Module:
    """The unpatched base model for `run_cfg`, in `actor.model.dtype`.

    Args:
        run_cfg: the validated run config.
        create: build and cache the built-in base when missing; False returns the seeded
            initial weights instead (shapes and names only, for `inspect`).
        log: where progress lines go.

    Raises:
        ConfigError: a bad `model_path` or a base that cannot be written.
    """
    path, dtype = run_cfg.actor.model.model_path, run_cfg.actor.model.dtype
    if path is not None:
        return load_model_folder(path, dtype=dtype)
    folder = builtin_base_dir(run_cfg)
    if not _base_complete(folder):
        if not create:
            return task_class(run_cfg.task.kind).builtin_model(run_cfg).to(torch_dtype(dtype) or torch.float32)
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
