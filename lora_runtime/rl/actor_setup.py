"""The RL job's actor: its base (built-in or a model folder), its mode, its task view.

`build_actor(run_cfg) -> model` loads the base and applies `prepare_actor`.

- `actor.model.model_path: null` -> the built-in actor (`lora_runtime.rl.models.vla`). Its
  deterministic base (seeded init + warm start, `lora_runtime.rl.pretrain`) is written once in
  Hugging Face layout to `<base_dir>/tiny-vla-<hash of actor.builtin and task>/`, so the
  new, resume and full runs all start from the same weights. By default `base_dir` is
  `base/` beside `trainer.output_dir` when the output path names a parent folder
  (`runs/run` -> `runs/base`), else `base/` inside it (`out` -> `out/base`, `.` -> `./base`):
  never outside the folders the config names.
- a folder in Hugging Face layout -> `lora_runtime.rl.hf_loading.load_model_folder`.

Then `prepare_actor` applies the mode (new / resume / full).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lora_runtime.actor import prepare_actor
from lora_runtime.adapters import AdapterError, group_siblings, read_adapter, unwrap_model
from lora_runtime.config import ConfigError, RunConfig
from lora_runtime.rl.bc import behaviour_clone
from lora_runtime.rl.episodes import random_baseline
from lora_runtime.rl.evaluation import evaluate
from lora_runtime.rl.hf_loading import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_model_folder,
    save_model_folder,
    torch_dtype,
)
from lora_runtime.rl.models.vla import TinyVLA, build_tiny_vla
from lora_runtime.rl.outputs import check_output_dir
from lora_runtime.rl.pretrain import clear_action_rows, pretrain_base
from lora_runtime.rl.seeding import RunSeeds, base_seeds
from lora_runtime.rl.tasks.babyai import VIEW, BabyAIAdapter, check_env_id, make_babyai_env
from lora_runtime.rl.tasks.episodic import EpisodicTask, ObsBatch, quiet
from lora_runtime.rl.tasks.gym_entry import load_entry, make_gym_env
from lora_runtime.rl.tasks.reach import ReachTask, Scenes

BASE_FORMAT = 2  # bump when the base recipe changes, so old cached bases are not reused


def builtin_base_dir(run_cfg: RunConfig) -> str:
    """Where the built-in base for this config lives (absolute; may not exist yet)."""
    out = os.path.normpath(run_cfg.trainer.output_dir)
    parent = os.path.dirname(out)
    default = os.path.join(parent if parent not in ("", os.curdir) else out, "base")
    root = run_cfg.trainer.base_dir or default
    recipe = {"format": BASE_FORMAT, "builtin": run_cfg.actor.builtin.model_dump(), "task": run_cfg.task.base_recipe()}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(os.path.abspath(root), f"tiny-vla-{digest}")


def base_path(run_cfg: RunConfig) -> str:
    """The folder the base weights come from: `model_path`, or the built-in base folder."""
    path = run_cfg.actor.model.model_path
    return os.path.abspath(path) if path is not None else builtin_base_dir(run_cfg)


def _base_complete(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, n)) for n in (CONFIG_NAME, WEIGHTS_NAME))


def ensure_builtin_base(run_cfg: RunConfig, log: Callable[[str], None] = print) -> str:
    """Creates the built-in base folder unless it is already there; returns its path.

    Raises:
        ConfigError: the task does not fit the actor's sizes, or the folder cannot be written.
    """
    folder = builtin_base_dir(run_cfg)
    if _base_complete(folder):
        return folder
    key = "trainer.base_dir" if run_cfg.trainer.base_dir else "trainer.output_dir"
    check_output_dir(folder, overwrite=True, key=key)  # before the warm start, not after
    b = run_cfg.actor.builtin
    model = build_tiny_vla(b)
    log(f"building the built-in base actor (seed {b.seed}, {b.pretrain_steps} warm-start steps) -> {folder}")
    if run_cfg.task.kind == "reach":
        task = ReachTask(run_cfg.task, b.image_size, b.vocab_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(base_seeds(b.seed)[1])  # nothing in the warm start draws unseeded
            report = pretrain_base(model, task, b.pretrain_steps, b.pretrain_batch_size, b.pretrain_lr, b.seed).as_dict()
        clear_action_rows(model, task)
        log(f"base warm start: loss {report['final_loss']:.4f}, 'where is' accuracy {report['accuracy']:.3f}")
    else:
        report = warm_start_episodic(run_cfg, model, log)
    try:
        save_model_folder(model, folder, task=run_cfg.task.model_dump(), pretrain=report)
    except OSError as exc:
        if _base_complete(folder):  # another process wrote it meanwhile
            return folder
        key = "trainer.base_dir" if run_cfg.trainer.base_dir else "trainer.output_dir"
        raise ConfigError(
            f"cannot write the built-in base to {folder} ({exc.strerror}); set {key} to a writable folder"
        ) from None
    return folder


def warm_start_episodic(run_cfg: RunConfig, model: TinyVLA, log: Callable[[str], None]) -> dict[str, Any]:
    """Behaviour cloning of the built-in actor from the adapter's expert (if it has one)."""
    b, t = run_cfg.actor.builtin, run_cfg.task
    task = make_task(run_cfg, model)
    if not hasattr(task.adapter, "expert"):
        log("the task's adapter has no expert(env): the base is the seeded init, without a warm start")
        return {"steps": 0, "note": "no expert: no warm start"}
    with torch.random.fork_rng(devices=[]):
        return behaviour_clone(model, episode_logits, task, t.bc_episodes, b.pretrain_steps, b.pretrain_batch_size,
                               b.pretrain_lr, b.seed, t.eval_episodes, log=log)


def check_task(run_cfg: RunConfig) -> None:
    """Checks `task.env_id` / `task.entry` before any work (nothing is built or written).

    Raises:
        ConfigError: an unknown level, or an entry point that cannot be imported.
    """
    t = run_cfg.task
    if t.kind != "reach" and run_cfg.trainer.distributed != "none":
        raise ConfigError(
            f"trainer.distributed={run_cfg.trainer.distributed!r} is not supported with task.kind: {t.kind}: ranks play "
            "episodes of different lengths, so their collectives would not line up; use trainer.distributed: none"
        )
    if t.kind == "babyai":
        check_env_id(t.env_id)
    elif t.kind == "gym":
        load_entry(t.entry)


def load_base(run_cfg: RunConfig, create: bool = True, log: Callable[[str], None] = print) -> nn.Module:
    """The unpatched base model for `run_cfg`, in `actor.model.dtype`.

    Args:
        run_cfg: the validated run config.
        create: build and cache the built-in base when missing; False returns the seeded
            initial weights instead (shapes and names only, for `inspect`).
        log: where progress lines go.

    Raises:
        ConfigError: a bad `model_path` (see `hf_loading`) or a base that cannot be written.
    """
    path, dtype = run_cfg.actor.model.model_path, run_cfg.actor.model.dtype
    if path is not None:
        return load_model_folder(path, dtype=dtype)
    folder = builtin_base_dir(run_cfg)
    if not _base_complete(folder):
        if not create:
            return build_tiny_vla(run_cfg.actor.builtin).to(torch_dtype(dtype) or torch.float32)
        ensure_builtin_base(run_cfg, log)
    return load_model_folder(folder, key=f"built-in base {folder}", dtype=dtype)


def build_actor(run_cfg: RunConfig, create_base: bool = True, log: Callable[[str], None] = print) -> nn.Module:
    """Loads the base and applies the mode of `actor.model` with `prepare_actor`.

    New adapters are drawn from the "adapter_init" stream of `trainer.seed` (`RunSeeds`).

    Returns:
        The actor: patched with trainable adapters (new / resume) or fully trainable (full).

    Raises:
        ConfigError: bad `model_path`, or a task that does not fit the model.
        AdapterError: resume mode with a missing, corrupt or mismatching adapter (the message
            names `actor.model.lora_path`).
    """
    mc = run_cfg.actor.model
    check_task(run_cfg)
    adapter = None
    if mc.mode == "resume":  # a bad adapter fails before the base is loaded or built
        try:
            adapter = read_adapter(mc.lora_path)
        except AdapterError as exc:
            raise AdapterError(
                f"actor.model.lora_path={mc.lora_path!r}: {exc}. Point lora_path at the adapter/ folder "
                "a LoRA run saved (adapter_config.json + adapter_model.safetensors; e.g. train "
                "configs/lora_new.yaml first), or set lora_path: null to train a new adapter"
            ) from None
    try:
        model = load_base(run_cfg, create=create_base, log=log)
        make_task(run_cfg, model)  # fail early on a task that does not fit the model
        generator = RunSeeds(run_cfg.trainer.seed).generator("adapter_init")
        model = prepare_actor(model, mc, adapter=adapter, generator=generator)
        if mc.group_siblings and mc.mode != "full":
            group_actor_siblings(run_cfg, model)
        return model
    except AdapterError as exc:  # the adapter does not fit this model (rank, targets, shapes)
        raise AdapterError(f"actor.model.lora_path={mc.lora_path!r}: {exc}") from None
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"actor.model: {exc}") from None


def group_actor_siblings(run_cfg: RunConfig, model: nn.Module) -> list[list[str]]:
    """Groups the actor's LoRA layers that share an input, from one forward on one sample."""
    device = next(unwrap_model(model).parameters()).device
    task = make_task(run_cfg, model)
    if isinstance(task, EpisodicTask):  # one observation batch of a reset environment
        with quiet():
            observations, _ = task.env.reset(seed=0)
        obs = task.encode(task.split(observations)).to(device)
        return group_siblings(model, run=lambda m: episode_logits(m, obs))
    scenes = task.sample(1, torch.Generator().manual_seed(0)).to(device)
    logits_fn = logits_fn_for(model)
    return group_siblings(model, run=lambda m: logits_fn(m, scenes, scenes.prompt_ids, 1))


def vocab_size_of(model: nn.Module) -> int:
    model = unwrap_model(model)
    if isinstance(model, TinyVLA):
        return model.config.vocab_size
    return model.get_output_embeddings().out_features


def make_task(run_cfg: RunConfig, model: nn.Module) -> ReachTask | EpisodicTask:
    """The task sized for `model` (images for the built-in actor, tokens for a language model).

    Raises:
        ConfigError: a task that does not fit the model, an unknown level or entry point.
    """
    inner = unwrap_model(model)
    t = run_cfg.task
    if t.kind == "reach":
        image_size = inner.config.image_size if isinstance(inner, TinyVLA) else t.grid
        return ReachTask(t, image_size, vocab_size_of(inner))
    image_size = inner.config.image_size if isinstance(inner, TinyVLA) else None
    check_task(run_cfg)
    if t.kind == "babyai":
        if image_size is not None and image_size % VIEW:
            raise ConfigError(
                f"task.kind: babyai renders the {VIEW}x{VIEW} partial view, so actor.builtin.image_size must be a "
                f"multiple of {VIEW} (got {image_size}; e.g. 28 with patch_size 4: one patch per cell)"
            )
        adapter = BabyAIAdapter(t.env_id, (image_size or VIEW) // VIEW)

        def make_env() -> Any:
            return make_babyai_env(t.env_id, t.max_episode_steps)
    else:
        _, adapter = make_gym_env(t.entry)

        def make_env() -> Any:
            return make_gym_env(t.entry)[0]
    name = t.env_id if t.kind == "babyai" else t.entry
    with quiet():
        return EpisodicTask(name, make_env, adapter, t.num_envs, vocab_size_of(inner), image_size, t.max_episode_steps,
                            t.prev_action)


def measure_chance(task: ReachTask | EpisodicTask, run_cfg: RunConfig) -> None:
    """Fills an episodic task's `chance_reward` (the random policy's mean return) and `levels`
    (random success; the warm start's greedy held-out success, from the built-in base's record)."""
    if not isinstance(task, EpisodicTask):
        return
    rand = random_baseline(task)
    task.chance_reward = rand["reward_mean"]
    task.levels = {"random_success": rand["success_rate"]}
    if run_cfg.actor.model.model_path is None:
        with open(os.path.join(builtin_base_dir(run_cfg), CONFIG_NAME), encoding="utf-8") as f:
            report = json.load(f).get("pretrain", {})
        if "warm_start_success" in report and report.get("eval_episodes") != run_cfg.task.eval_episodes:
            # the base was cached with another task.eval_episodes (not part of its hash): measure again
            with torch.random.fork_rng(devices=[]):
                warm = evaluate(load_base(run_cfg, create=False), episode_logits, task, run_cfg.task.eval_episodes)
            report["warm_start_success"] = round(warm["success_rate"], 5)
        if "warm_start_success" in report:
            task.levels["warm_start_success"] = report["warm_start_success"]


def vla_logits(model: nn.Module, scenes: Scenes, input_ids: torch.Tensor, image_repeats: int) -> torch.Tensor:
    """The built-in actor sees the image: `[B*G, T, V]` logits at the text positions."""
    return model(scenes.pixel_values, input_ids, image_repeats)


def causal_lm_logits(model: nn.Module, scenes: Scenes, input_ids: torch.Tensor, image_repeats: int) -> torch.Tensor:
    """A text-only causal LM reads the board as one token per cell before the instruction."""
    board = scenes.scene_ids.repeat_interleave(image_repeats, dim=0)  # [B*G, S]
    ids = torch.cat([board, input_ids], dim=1)  # [B*G, S + T]
    return model(input_ids=ids, use_cache=False).logits[:, board.shape[1]:]  # [B*G, T, V]


def vla_episode_logits(model: nn.Module, obs: ObsBatch) -> torch.Tensor:
    """The built-in actor on encoded observations: `[N, V]` logits at each prompt's last word."""
    logits = model(obs.pixels.float() / 255.0, obs.prompt_ids)  # [N, T, V]
    return logits[torch.arange(len(obs), device=logits.device), obs.lengths - 1]


def causal_lm_episode_logits(model: nn.Module, obs: ObsBatch) -> torch.Tensor:
    """A text-only causal LM reads the view as words, then the prompt: `[N, V]` at the last word."""
    ids = torch.cat([obs.symbol_ids, obs.prompt_ids], dim=1)  # [N, S + T]
    logits = model(input_ids=ids, use_cache=False).logits  # [N, S + T, V]
    return logits[torch.arange(len(obs), device=logits.device), obs.symbol_ids.shape[1] + obs.lengths - 1]


def episode_logits(model: nn.Module, obs: ObsBatch) -> torch.Tensor:
    """`vla_episode_logits` or `causal_lm_episode_logits`, by the model's type."""
    if isinstance(unwrap_model(model), TinyVLA):
        return vla_episode_logits(model, obs)
    return causal_lm_episode_logits(model, obs)


def logits_fn_for(model: nn.Module, task: ReachTask | EpisodicTask | None = None) -> Any:
    """The logits function for `model` on `task`: `vla_logits` / `causal_lm_logits` on the reach
    task, `episode_logits` on a multi-step task."""
    if isinstance(task, EpisodicTask):
        return episode_logits
    return vla_logits if isinstance(unwrap_model(model), TinyVLA) else causal_lm_logits
