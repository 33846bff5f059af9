"""Checkpoints of a run: the weights (`adapter/` or `model/`) and, apart from them, the
training state `train_state/state.pt` (optimizer, step, RNG) for an exact continuation.

A resume run (`lora_path: <run>/adapter`) or a full run from `model_path: <run>/model`
finds `<run>/train_state/` beside the weights and, with `trainer.resume_train_state: true`,
continues the optimizer, the step count and the random streams where that run stopped:
N steps, then M more, give the same weights as N + M steps in one go.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lora_runtime import parallel
from lora_runtime._fs import atomic_dir
from lora_runtime.adapters import save_adapter, unwrap_model
from lora_runtime.config import RunConfig, TrainerConfig
from lora_runtime.rl.hf_loading import save_model_folder
from lora_runtime.rl.outputs import UsageError

STATE_DIR = "train_state"
STATE_FILE = "state.pt"
STATE_FORMAT = 1


@dataclass
class TrainState:
    """The step just finished and the sampling generator after it."""

    step: int
    generator: torch.Generator


def trainable_named(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in unwrap_model(model).named_parameters() if p.requires_grad]


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of the trainable parameters' bytes: ties a training state to its weights."""
    h = hashlib.sha256()
    for name, p in trainable_named(model):
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def weights_dir(out: str, mode: str) -> str:
    """Where a run keeps its weights: `<out>/model` in full mode, `<out>/adapter` otherwise."""
    return os.path.join(out, "model" if mode == "full" else "adapter")


def save_weights(out: str, model: nn.Module, mode: str, run_cfg: RunConfig) -> None:
    """Writes `weights_dir(out, mode)` atomically. A collective in a process group (FSDP2
    shards are gathered); rank 0 alone writes."""
    if mode != "full":
        save_adapter(model, weights_dir(out, mode))
        return
    inner = unwrap_model(model)
    with parallel.gathered(inner):  # whole weights on every rank (no-op unsharded)
        if parallel.is_main_process():
            save_model_folder(inner, weights_dir(out, mode), task=run_cfg.task.model_dump())
    parallel.barrier()


def save_weights_and_state(
    out: str, model: nn.Module, mode: str, optimizer: torch.optim.Optimizer, state: TrainState, run_cfg: RunConfig
) -> None:
    """Writes `adapter/` (LoRA modes) or `model/` (full mode), then `train_state/`, each atomically."""
    save_weights(out, model, mode, run_cfg)
    payload = {
        "format": STATE_FORMAT,
        "step": state.step,
        "mode": mode,
        "param_names": [n for n, _ in trainable_named(model)],
        "weights_sha256": weights_fingerprint(model),
        "optimizer": optimizer.state_dict(),
        "generator": state.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_dir(os.path.join(out, STATE_DIR)) as staging:
        torch.save(payload, os.path.join(staging, STATE_FILE))


def find_train_state(run_cfg: RunConfig) -> str | None:
    """The `train_state/` folder beside the weights this run starts from, if there is one."""
    mc = run_cfg.actor.model
    source = mc.lora_path if mc.mode == "resume" else mc.model_path if mc.mode == "full" else None
    if source is None:
        return None
    folder = os.path.join(os.path.dirname(os.path.abspath(source.rstrip("/\\"))), STATE_DIR)
    return folder if os.path.isfile(os.path.join(folder, STATE_FILE)) else None


def load_train_state(
    folder: str, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator, cfg: TrainerConfig
) -> int:
    """Restores optimizer, RNG streams and step from `folder`; returns the step.

    The learning rate and weight decay stay those of the current config.

    Raises:
        UsageError: an unreadable state, or one that belongs to other weights (the message
            says how to start without it).
    """
    path = os.path.join(folder, STATE_FILE)
    skip = "or start with a fresh optimizer: --set trainer.resume_train_state=false"
    try:
        data: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise UsageError(f"{path}: cannot read the training state ({exc}); delete it {skip}") from None
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        raise UsageError(f"{path}: not a lora-runtime training state (format {STATE_FORMAT}); {skip}")
    names = [n for n, _ in trainable_named(model)]
    if data["param_names"] != names:
        raise UsageError(
            f"{path}: the training state is for {len(data['param_names'])} trainable tensors "
            f"({data['mode']} mode), this run trains {len(names)}; use the matching config {skip}"
        )
    if data["weights_sha256"] != weights_fingerprint(model):
        raise UsageError(
            f"{path}: the training state was saved with other weights than the ones loaded now "
            f"(step {data['step']}); was the adapter or model replaced? {skip}"
        )
    optimizer.load_state_dict(data["optimizer"])
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
    generator.set_state(data["generator"])
    torch.set_rng_state(data["torch_rng"])
    return int(data["step"])
