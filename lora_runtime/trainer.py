"""The GRPO trainer: `train(run_cfg)` fine-tunes the actor in its mode and writes the run.

One step: sample `batch_size` scenes, `group_size` action sequences each (`grpo`), score
them, take `update_epochs` clipped-ratio updates with an optional KL penalty to the
reference policy (the base: `adapter_disabled` in LoRA modes, a frozen copy in full mode).

`trainer.output_dir` receives `adapter/` (LoRA modes) or `model/` (full mode), the
training state `train_state/` (optimizer, step, RNG; apart from the weights),
`metrics.jsonl`, `curves.png`, `summary.json` and the resolved `config.yaml`.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from torch import nn

from lora_runtime import distributed, grpo
from lora_runtime.actor import base_path, build_actor, logits_fn_for, make_task
from lora_runtime.checkpoint import save_adapter
from lora_runtime.config import RunConfig, TrainerConfig
from lora_runtime.console import ProgressBar, print_table
from lora_runtime.hf_loading import save_model_folder
from lora_runtime.outputs import (
    MetricsWriter,
    UsageError,
    check_output_dir,
    peak_memory_mb,
    plot_curves,
    write_json_atomic,
    write_text_atomic,
)
from lora_runtime.registry import iter_lora_layers, trainable_summary, unwrap_model
from lora_runtime.task import ReachTask
from lora_runtime.train_state import (
    TrainState,
    find_train_state,
    load_train_state,
    save_weights_and_state,
)

SUMMARY_WINDOW = 5  # "first" / "final" reward = mean over this many steps


@dataclass
class RunResult:
    """What `train` returns: where the run went, its `summary.json` content, the actor."""

    output_dir: str
    interrupted: bool
    summary: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None  # the trained actor (patched in LoRA modes)


def resolve_device(name: str) -> torch.device:
    """`trainer.device` -> a torch device ("auto": cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"trainer.device={name!r} but CUDA is not available here; use 'cpu' or 'auto'")
    return torch.device(name)


def check_distributed(cfg: TrainerConfig) -> None:
    """`trainer.distributed` other than "none" needs an initialised process group."""
    if cfg.distributed != "none" and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise UsageError(
            f"trainer.distributed={cfg.distributed!r} needs torch.distributed initialised (launch with "
            "torchrun); set trainer.distributed: none for a single process"
        )


class Reference:
    """Log-probabilities of the reference policy: the base model.

    LoRA modes compute it with the adapters disabled (no copy); full mode keeps a frozen
    copy of the weights taken before training.
    """

    def __init__(self, model: nn.Module, mode: str) -> None:
        self.frozen: nn.Module | None = None
        if mode == "full":
            self.frozen = copy.deepcopy(unwrap_model(model)).eval()
            for p in self.frozen.parameters():
                p.requires_grad_(False)
        self.model = model

    @torch.no_grad()
    def dists(self, logits_fn: grpo.LogitsFn, rollout: grpo.Rollout, action_ids: torch.Tensor, temp: float) -> torch.Tensor:
        """`[N, A, K]` reference log-probabilities over the action bins."""
        if self.frozen is not None:
            return grpo.policy_log_probs(self.frozen, logits_fn, rollout, action_ids, temp)[1]
        from lora_runtime.compile import adapter_disabled

        with adapter_disabled(self.model):
            return grpo.policy_log_probs(self.model, logits_fn, rollout, action_ids, temp)[1]


def rl_step(
    model: nn.Module,
    forward_model: nn.Module,
    logits_fn: grpo.LogitsFn,
    reference: Reference,
    optimizer: torch.optim.Optimizer,
    task: ReachTask,
    cfg: TrainerConfig,
    generator: torch.Generator,
    device: torch.device,
) -> dict[str, float]:
    """One GRPO step (rollout, reference, `update_epochs` updates); returns its metrics."""
    start = time.perf_counter()
    action_ids = torch.tensor(task.tokens.actions, device=device)
    scenes = task.sample(distributed.share_size(cfg.batch_size), generator).to(device)  # this rank's share
    model.eval()
    rollout = grpo.collect_rollout(
        forward_model, logits_fn, task, scenes, action_ids, cfg.group_size, cfg.temperature, generator
    )
    ref = reference.dists(logits_fn, rollout, action_ids, cfg.temperature)  # [N, A, K]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(cfg.update_epochs):
        logp, dist = grpo.policy_log_probs(forward_model, logits_fn, rollout, action_ids, cfg.temperature)
        kl = grpo.kl_divergence(dist, ref)
        loss, stats = grpo.grpo_loss(logp, rollout.old_logp, rollout.advantages, kl, cfg.clip_eps, cfg.kl_coef)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    entropy = -(dist.detach().exp() * dist.detach()).sum(-1).mean()
    return {
        "reward_mean": rollout.rewards.mean().item(),
        "reward_std": rollout.rewards.std().item(),
        "loss": loss.item(),
        "entropy": entropy.item(),
        "grad_norm": grad_norm.item(),
        "step_time_s": elapsed,
        "samples_per_s": rollout.rewards.numel() / elapsed,
        **stats,
    }


class _Interrupt:
    """First Ctrl-C asks the loop to stop after the current step; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False

    def handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@contextmanager
def _catch_sigint(flag: _Interrupt) -> Iterator[None]:
    try:
        previous = signal.signal(signal.SIGINT, flag.handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def lr_at(cfg: TrainerConfig, i: int) -> float:
    """Learning rate of this run's step `i` (0-based): constant, or cosine from `lr` down to
    `lr * min_lr_ratio` over this run's `steps` (a resumed run starts its own schedule)."""
    if cfg.lr_schedule == "constant" or cfg.steps == 1:
        return cfg.lr
    progress = i / (cfg.steps - 1)
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


@dataclass
class Session:
    """Everything one run holds while it trains."""

    run_cfg: RunConfig
    model: nn.Module
    forward_model: nn.Module  # `model`, or its torch.compile wrapper
    task: ReachTask
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    reference: Reference
    device: torch.device
    out: str
    start_step: int = 0

    @property
    def mode(self) -> str:
        return self.run_cfg.actor.model.mode

    def save(self, step: int) -> None:
        if self.run_cfg.trainer.distributed != "none":
            return _save_distributed(self)
        save_weights_and_state(self.out, self.model, self.mode, self.optimizer, TrainState(step, self.generator), self.run_cfg)

    def training_memory_mb(self) -> float:
        """Weights, gradients, optimizer state and the frozen reference copy (if any)."""
        tensors = list(self.model.parameters())
        tensors += [p for p in self.model.parameters() if p.requires_grad]  # one gradient each
        tensors += [t for st in self.optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
        if self.reference.frozen is not None:
            tensors += list(self.reference.frozen.parameters())
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def train(
    run_cfg: RunConfig,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Runs GRPO on the reach task in the mode of `run_cfg.actor.model` and writes the run.

    Everything that can be wrong with the input (output folder, base model, adapter,
    training state) is checked before anything is written to `trainer.output_dir`.

    Args:
        run_cfg: the validated run config.
        on_step: called with each step's metrics record (after it is written).
        log: where progress lines go.

    Returns:
        The output folder, whether Ctrl-C stopped the run, and the summary.

    Raises:
        ConfigError: bad `model_path`, or a task that does not fit the model.
        AdapterError: resume mode without a usable adapter at `lora_path`.
        UsageError: an output folder holding results (without `trainer.overwrite`) or not
            writable, a device that is not there, a training state that does not fit.
    """
    cfg = run_cfg.trainer
    device = resolve_device(cfg.device)
    if cfg.distributed == "none":
        return _train(run_cfg, on_step, log, device)
    try:  # under torchrun: join the group; rank 0 alone prints and writes
        device = distributed.init_distributed("nccl" if device.type == "cuda" else "gloo").device
    except RuntimeError as exc:
        raise UsageError(f"trainer.distributed={cfg.distributed!r}: {exc}") from None
    try:
        return _train(run_cfg, on_step, log if distributed.is_main_process() else _quiet, device)
    finally:
        distributed.shutdown_distributed()


def _quiet(message: str) -> None:
    """The `log` of ranks other than 0."""


def _train(run_cfg: RunConfig, on_step, log, device: torch.device) -> RunResult:
    cfg = run_cfg.trainer
    check_distributed(cfg)
    out = check_output_dir(cfg.output_dir, cfg.overwrite)
    world = distributed.get_world_size()
    if cfg.batch_size % world:
        raise UsageError(f"trainer.batch_size={cfg.batch_size} cannot be split over {world} ranks; use a multiple of {world}")
    distributed.barrier()  # every rank has checked the folder before rank 0 writes into it
    with _threads(cfg.num_threads):
        with distributed.main_process_first():  # rank 0 builds and caches the built-in base
            model = build_actor(run_cfg, log=log).to(device)
        reference = Reference(model, run_cfg.actor.model.mode)  # full mode copies the plain model
        model = distributed.wrap_actor(model, cfg.distributed)  # FSDP2 in place, or the DDP wrapper
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        generator = torch.Generator().manual_seed(cfg.seed + distributed.get_rank())
        torch.manual_seed(cfg.seed)
        session = Session(run_cfg, model, model, make_task(run_cfg, model), optimizer, generator,
                          reference, device, out)
        state_dir = find_train_state(run_cfg) if cfg.resume_train_state else None
        if state_dir is not None and cfg.distributed != "none":
            log(f"{state_dir} is not restored in distributed runs; the optimizer starts fresh")
            state_dir = None
        if state_dir is not None:
            session.start_step = load_train_state(state_dir, model, optimizer, generator, cfg)
            log(f"continuing from {state_dir} (optimizer, RNG) at step {session.start_step}")
        if cfg.compile:
            from lora_runtime.compile import compile_actor

            session.forward_model = compile_actor(model)
        return _run(session, on_step, log)


def _run(session: Session, on_step: Callable[[dict[str, Any]], None] | None, log: Callable[[str], None]) -> RunResult:
    cfg, out = session.run_cfg.trainer, session.out
    logits_fn = logits_fn_for(session.model)
    main = distributed.is_main_process()
    if main:
        os.makedirs(out, exist_ok=True)
        write_text_atomic(os.path.join(out, "config.yaml"), yaml.safe_dump(_resolved(session.run_cfg), sort_keys=False))
    name = os.path.basename(out)
    log(f"{name}: mode {session.mode}, {trainable_summary(session.model)}; {session.task.describe()}")
    metrics = MetricsWriter(os.path.join(out, "metrics.jsonl")) if main else None
    bar = ProgressBar(f"{name} ({session.mode})", cfg.steps, session.start_step + 1, enabled=cfg.progress and main)
    records: list[dict[str, Any]] = []
    flag = _Interrupt()
    step = session.start_step
    try:
        with _catch_sigint(flag):
            for i in range(cfg.steps):
                if flag.requested:
                    break
                step = session.start_step + i + 1
                for group in session.optimizer.param_groups:
                    group["lr"] = lr_at(cfg, i)
                stats = rl_step(session.model, session.forward_model, logits_fn, session.reference,
                                session.optimizer, session.task, cfg, session.generator, session.device)
                stats = distributed.reduce_metrics(stats)  # means over ranks
                stats["samples_per_s"] *= distributed.get_world_size()  # all ranks' samples
                record = {"step": step, **stats, "chance_reward": session.task.chance_reward,
                          "lr": session.optimizer.param_groups[0]["lr"]}
                records.append(record)
                if metrics is not None:
                    metrics.write(record)
                bar.update(i + 1, record)
                if on_step is not None:
                    on_step(record)
                if cfg.save_every and step % cfg.save_every == 0 and i + 1 < cfg.steps:
                    session.save(step)
            session.save(step)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    return _finish(session, records, flag.requested, log)


def _save_distributed(session: Session) -> None:
    """Every rank calls this; rank 0 writes the weights (gathered from FSDP2 shards). No
    `train_state/`: optimizer shards and per-rank RNG streams are not saved."""
    if session.mode != "full":
        save_adapter(session.model, os.path.join(session.out, "adapter"))  # collective
        return
    model = unwrap_model(session.model)
    with distributed.gathered(model):  # whole weights on every rank
        if distributed.is_main_process():
            save_model_folder(model, os.path.join(session.out, "model"), task=session.run_cfg.task.model_dump())
    distributed.barrier()


def _resolved(run_cfg: RunConfig) -> dict[str, Any]:
    """The config as run, with the base folder made explicit (what `merge` reads back)."""
    data = run_cfg.model_dump(mode="json")
    if run_cfg.actor.model.model_path is None:
        data["trainer"]["base_dir"] = os.path.dirname(base_path(run_cfg))
    return data


def _finish(session: Session, records: list[dict[str, Any]], interrupted: bool, log: Callable[[str], None]) -> RunResult:
    cfg, out = session.run_cfg.trainer, session.out
    rewards = [r["reward_mean"] for r in records]
    times = [r["step_time_s"] for r in records[1:]] or [r["step_time_s"] for r in records]
    counts = trainable_summary(session.model)
    peak, peak_kind = peak_memory_mb(session.device)
    summary = {
        "mode": session.mode,
        "output_dir": out,
        "base": base_path(session.run_cfg),
        "lora_path": session.run_cfg.actor.model.lora_path,
        "steps_run": len(records),
        "first_step": session.start_step + 1,
        "last_step": records[-1]["step"] if records else session.start_step,
        "interrupted": interrupted,
        "chance_reward": session.task.chance_reward,
        "first_reward": _mean(rewards[:SUMMARY_WINDOW]),
        "final_reward": _mean(rewards[-SUMMARY_WINDOW:]),
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "lora_layers": len(list(iter_lora_layers(session.model))),
        "step_time_s": _mean(times),
        "samples_per_s": _mean([r["samples_per_s"] for r in records]),
        "peak_memory_mb": round(peak, 1),
        "peak_memory_kind": peak_kind,
        "training_memory_mb": round(session.training_memory_mb(), 3),
        "device": str(session.device),
        "compile": cfg.compile,
    }
    if not distributed.is_main_process():
        return RunResult(out, interrupted, summary, session.model)
    note = plot_curves(records, os.path.join(out, "curves.png"), os.path.basename(out)) if cfg.plot else "trainer.plot is false"
    summary["curves"] = None if note else os.path.join(out, "curves.png")
    if note:
        log(f"curves.png not written: {note}")
    write_json_atomic(os.path.join(out, "summary.json"), summary)
    if cfg.progress:
        print_summary(summary)
    return RunResult(out, interrupted, summary, session.model)


def print_summary(summary: dict[str, Any]) -> None:
    """The end-of-run table."""
    weights = "adapter/" if summary["mode"] != "full" else "model/"
    rows = [
        ("mode", summary["mode"]),
        ("steps", f"{summary['steps_run']} (steps {summary['first_step']}-{summary['last_step']})"
         + ("  [interrupted]" if summary["interrupted"] else "")),
        ("reward: chance", f"{summary['chance_reward']:.4f}"),
        (f"reward: first {SUMMARY_WINDOW} steps", f"{summary['first_reward']:.3f}"),
        (f"reward: last {SUMMARY_WINDOW} steps", f"{summary['final_reward']:.3f}"),
        ("trainable / total params", f"{summary['trainable_params']:,} / {summary['total_params']:,}"),
        ("step time", f"{summary['step_time_s']:.3f} s ({summary['samples_per_s']:.0f} samples/s)"),
        ("memory", (f"peak {summary['peak_memory_mb']:.0f} MB ({summary['peak_memory_kind']}); weights, "
                    f"grads, optimizer, reference {summary['training_memory_mb']:.2f} MB")),
        ("outputs", f"{summary['output_dir']}/ ({weights} train_state/ metrics.jsonl curves.png)"),
    ]
    print_table(f"run summary: {os.path.basename(summary['output_dir'])}", ["", "value"], rows)
