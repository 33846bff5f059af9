"""Checkpoints of a run: the weights (`adapter/` or `model/`) and, apart from them, the
training state `train_state/` (optimizer, step, RNG) for an exact continuation.

`train_state/` is a `torch.distributed.checkpoint` (DCP) folder plus `meta.json`, in a
single process and under torchrun alike:

- the optimizer state, keyed by parameter name (`get_optimizer_state_dict`): each rank
  writes its own shards under FSDP2, one copy is written for replicated (DDP, single
  process) state;
- per rank, the sampling generator and torch's default generator (`rank<r>.*` entries);
- `meta.json` (rank 0): format, step, mode, world size, trainable tensor names and the
  sha256 of the trainable weights it belongs to.

It is written into a staging folder and swapped in by rank 0 once every rank has written
(`parallel.shared_dir`), so a run killed at any moment leaves the previous complete state.

A resume run (`lora_path: <run>/adapter`) or a full run from `model_path: <run>/model`
finds `<run>/train_state/` beside the weights and, with `runner.resume_train_state: true`,
continues the optimizer, the step count and the random streams where that run stopped:
N steps, then M more, give the same weights as N + M steps in one go, on the same world
size. Another world size is refused: the per-rank sampling streams cannot be split or
joined so that the continuation stays exact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from lora_runtime import parallel
from lora_runtime._fs import write_json_atomic
from lora_runtime.adapters import save_adapter, unwrap_model
from lora_runtime.config import AlgorithmConfig, RunConfig
from lora_runtime.parallel.shared_dir import shared_atomic_dirs
from lora_runtime.rl.models import save_model_folder
from lora_runtime.rl.outputs import UsageError
from lora_runtime.rl.value_head import save_full_mode_head, value_head_set_aside

STATE_DIR = "train_state"
META_FILE = "meta.json"
STATE_FORMAT = 2  # 1: a single state.pt (single process only)


@dataclass
class TrainState:
    """The step just finished and the sampling generator after it."""

    step: int
    generator: torch.Generator


def trainable_named(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in unwrap_model(model).named_parameters() if p.requires_grad]


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of the trainable parameters' bytes: ties a training state to its weights.
    A collective for FSDP2-sharded parameters (each is gathered in turn)."""
    h = hashlib.sha256()
    for name, p in trainable_named(model):
        h.update(name.encode())
        full = parallel.full_tensor(p.detach())
        h.update(full.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def weights_dir(out: str, mode: str) -> str:
    """Where a run keeps its weights: `<out>/model` in full mode, `<out>/adapter` otherwise."""
    return os.path.join(out, "model" if mode == "full" else "adapter")


def save_weights(folder: str, model: nn.Module, mode: str, run_cfg: RunConfig) -> None:
    """Writes the adapter (LoRA modes) or the model (full mode) to `folder`, atomically.
    A collective in a process group (FSDP2 shards are gathered); rank 0 alone writes."""
    if mode != "full":
        save_adapter(model, folder)
        return
    inner = unwrap_model(model)
    with parallel.gathered(inner), value_head_set_aside(inner) as head:  # whole weights on every rank
        if parallel.is_main_process():
            save_model_folder(inner, folder, task=run_cfg.task.model_dump())
            if head is not None:
                save_full_mode_head(head, folder)
    parallel.barrier()


def _rng_states(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """This rank's random streams (byte tensors), under keys no other rank uses."""
    rank = parallel.get_rank()
    states = {f"rank{rank}.generator": generator.get_state(), f"rank{rank}.torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states[f"rank{rank}.cuda_rng"] = torch.cuda.get_rng_state()
    return states


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns that it assumes one process when there is no process group: that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class _Writer(dcp.FileSystemWriter):
    """DCP's file writer without `StorageMeta` in `.metadata` (the staging folder's path and
    a random save id): two equal runs write equal bytes."""

    def storage_meta(self) -> None:
        return None


def _state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> dict[str, Any]:
    """What DCP saves and loads: the optimizer by parameter name, this rank's RNG states."""
    return {"optimizer": get_optimizer_state_dict(unwrap_model(model), optimizer), "rng": _rng_states(generator)}


def save_weights_and_state(
    out: str, model: nn.Module, mode: str, optimizer: torch.optim.Optimizer, state: TrainState, run_cfg: RunConfig
) -> list[str]:
    """Writes `adapter/` (LoRA modes) or `model/` (full mode) and `train_state/`: both
    staged first, then swapped in one right after the other by rank 0 (`shared_atomic_dirs`),
    so a rank killed while saving leaves the previous pair. A collective in a process group.

    Returns:
        The folders written, in order.
    """
    meta = {
        "format": STATE_FORMAT,
        "step": state.step,
        "mode": mode,
        "world_size": parallel.get_world_size(),
        "distributed": run_cfg.runner.distributed,
        "param_names": [n for n, _ in trainable_named(model)],
        "weights_sha256": weights_fingerprint(model),
    }
    targets = [weights_dir(out, mode), os.path.join(out, STATE_DIR)]
    with shared_atomic_dirs(*targets) as (weights_staging, state_staging):
        save_weights(weights_staging, model, mode, run_cfg)
        with _single_process_ok():
            dcp.save(_state_dict(model, optimizer, state.generator), storage_writer=_Writer(state_staging))
        if parallel.is_main_process():
            write_json_atomic(os.path.join(state_staging, META_FILE), meta)
    return targets


def source_run_dir(run_cfg: RunConfig) -> str | None:
    """The folder of the run this one starts from: the parent of `lora_path` (resume mode)
    or of `model_path` (full mode; any model folder's parent), else None. Absolute."""
    mc = run_cfg.actor.model
    source = mc.lora_path if mc.mode == "resume" else mc.model_path if mc.mode == "full" else None
    return None if source is None else os.path.dirname(os.path.abspath(source.rstrip("/\\")))


def continues_in_place(run_cfg: RunConfig) -> bool:
    """A run continued in place: `runner.output_dir` is the folder of the run it starts from
    (`lora_path: <out>/adapter`, or `model_path: <out>/model` in full mode) and that folder
    holds the weights where this run saves them (`weights_dir`). Such a run needs no
    `runner.overwrite`: it appends to that run's `metrics.jsonl` (steps numbered on) and
    its `curves.png` and `summary.json` cover the whole history."""
    source = source_run_dir(run_cfg)
    mc = run_cfg.actor.model
    own = weights_dir(os.path.abspath(run_cfg.runner.output_dir), mc.mode)
    origin = os.path.abspath((mc.lora_path if mc.mode == "resume" else mc.model_path or "").rstrip("/\\"))
    return source is not None and os.path.realpath(origin) == os.path.realpath(own)


def find_train_state(run_cfg: RunConfig) -> str | None:
    """The `train_state/` folder beside the weights this run starts from, if there is one."""
    source = source_run_dir(run_cfg)
    if source is None:
        return None
    folder = os.path.join(source, STATE_DIR)
    return folder if os.path.isdir(folder) else None


def _read_meta(folder: str, skip: str) -> dict[str, Any]:
    path = os.path.join(folder, META_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read the training state ({exc}); delete {folder} {skip}") from None
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise UsageError(
            f"{path}: training state format {found!r}, this version reads format {STATE_FORMAT}; {skip}"
        )
    return meta


def load_train_state(
    folder: str, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator, cfg: AlgorithmConfig
) -> int:
    """Restores optimizer, RNG streams and step from `folder`; returns the step.

    A collective in a process group: every rank reads its shards and its own RNG states.
    The learning rate and weight decay stay those of the current config.

    Raises:
        UsageError: an unreadable state, one saved by another number of ranks, or one that
            belongs to other weights (the message says how to start without it). Nothing
            is changed then.
    """
    skip = "or start with a fresh optimizer: --set runner.resume_train_state=false"
    meta = _read_meta(folder, skip)
    world = parallel.get_world_size()
    if meta["world_size"] != world:
        raise UsageError(
            f"{folder}: the training state was saved by {meta['world_size']} process(es), this run has "
            f"{world}; the per-rank random streams cannot be continued exactly on another world size. "
            f"Launch with --nproc_per_node {meta['world_size']} {skip}"
        )
    names = [n for n, _ in trainable_named(model)]
    if meta["param_names"] != names:
        raise UsageError(
            f"{folder}: the training state is for {len(meta['param_names'])} trainable tensors "
            f"({meta['mode']} mode), this run trains {len(names)}; use the matching config {skip}"
        )
    if meta["weights_sha256"] != weights_fingerprint(model):
        raise UsageError(
            f"{folder}: the training state was saved with other weights than the ones loaded now "
            f"(step {meta['step']}); was the adapter or model replaced? {skip}"
        )
    state = _state_dict(model, optimizer, generator)  # creates the optimizer's tensors to load into
    try:
        with _single_process_ok():
            dcp.load(state, checkpoint_id=folder)
    except (CheckpointException, OSError, RuntimeError, ValueError, KeyError) as exc:
        optimizer.state.clear()
        raise UsageError(f"{folder}: cannot read the training state ({type(exc).__name__}: {exc}); {skip}") from None
    set_optimizer_state_dict(unwrap_model(model), optimizer, state["optimizer"])
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
    rank = parallel.get_rank()
    generator.set_state(state["rng"][f"rank{rank}.generator"])
    torch.set_rng_state(state["rng"][f"rank{rank}.torch_rng"])
    if f"rank{rank}.cuda_rng" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"][f"rank{rank}.cuda_rng"])
    return int(meta["step"])
