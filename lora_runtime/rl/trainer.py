"""The trainer: `train(run_cfg)` fine-tunes the actor in its mode and writes the run.

The step itself is `rl.loop.rl_step` (any task, any algorithm); this module sets the run up, loops, saves and sums up.
A front end shows progress through a `Display` (the CLI's draws a progress bar and a table).

`runner.output_dir` receives `adapter/` (LoRA modes) or `model/` (full mode), the
training state `train_state/` (optimizer, step, RNG; apart from the weights),
`metrics.jsonl`, `curves.png`, `summary.json` and the resolved `config.yaml`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lora_runtime import parallel
from lora_runtime._fs import (
    remove_stale_staging,
    removed_on_error,
    write_json_atomic,
    write_text_atomic,
)
from lora_runtime._memory import MemoryReleaser
from lora_runtime.adapters import iter_lora_layers, trainable_summary, unwrap_model
from lora_runtime.compile import compile_actor
from lora_runtime.config import RunConfig, RunnerConfig
from lora_runtime.rl.actor_builder import build_actor
from lora_runtime.rl.builtin_base import base_path, base_report, builtin_base_dir, load_base
from lora_runtime.rl.learners import GRPOLearner, PPOLearner, learner_for
from lora_runtime.rl.loop import lr_at, rl_step
from lora_runtime.rl.outputs import (
    MetricsWriter,
    UsageError,
    check_output_dir,
    peak_memory_mb,
    plot_curves,
    read_metrics,
)
from lora_runtime.rl.policy import ActorPolicy
from lora_runtime.rl.reference import Reference
from lora_runtime.rl.rollout_weights import RolloutWeights, check_rollout_weights, unmerged_only
from lora_runtime.rl.run_control import Interrupt, catch_signals, num_threads
from lora_runtime.rl.seeding import RunSeeds
from lora_runtime.rl.step_metrics import reduce_step_stats
from lora_runtime.rl.tasks import Task, build_task
from lora_runtime.rl.train_state import (
    TrainState,
    continues_in_place,
    find_train_state,
    load_train_state,
    save_weights_and_state,
)
from lora_runtime.rl.value_head import VALUE_HEAD, attach_value_head

__all__ = ["Display", "RunResult", "train"]

SUMMARY_WINDOW = 5  # "first" / "final" reward = mean over this many steps


@dataclass
class RunResult:
    """What `train` returns: where the run went, its `summary.json` content, the actor."""

    output_dir: str
    interrupted: bool
    summary: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None  # the trained actor (patched in LoRA modes)
    stop_signal: str | None = None  # "SIGINT" or "SIGTERM" when a signal stopped the run
    saved: list[str] = field(default_factory=list)  # what the last save wrote (absolute paths)
    is_main: bool = True  # rank 0 (or a single process): the one that reports


class Display:
    """What a front end shows of a run. This base shows nothing (the library default);
    `runner.progress: false` or a rank other than 0 gets this one too."""

    def start(self, title: str, total: int, first_step: int) -> None:
        """Before the first step: `total` steps, numbered from `first_step`."""

    def step(self, done: int, record: dict[str, Any]) -> None:
        """After each step: `done` steps of this run finished; `record` is its metrics."""

    def stop(self) -> None:
        """After the last step, or when the run is interrupted or fails."""

    def summary(self, summary: dict[str, Any]) -> None:
        """Once, with the content of `summary.json`."""


def check_distributed(cfg: RunnerConfig) -> None:
    """`runner.distributed` other than "none" needs an initialised process group."""
    if cfg.distributed != "none" and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise UsageError(
            f"runner.distributed={cfg.distributed!r} needs torch.distributed initialised (launch with "
            "torchrun); set runner.distributed: none for a single process"
        )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


@dataclass
class Session:
    """Everything one run holds while it trains."""

    run_cfg: RunConfig
    model: nn.Module
    forward_model: nn.Module  # `model`, or its torch.compile wrapper
    task: Task
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    reference: Reference
    device: torch.device
    out: str
    start_step: int = 0
    learner: GRPOLearner | PPOLearner | None = None
    saved: list[str] = field(default_factory=list)
    saved_step: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)  # earlier steps (continued in place)

    @property
    def mode(self) -> str:
        return self.run_cfg.actor.model.mode

    def save(self, step: int) -> None:
        """Weights, then `train_state/` (a collective under torchrun); once per step."""
        if self.saved and self.saved_step == step:
            return
        self.saved_step = step
        state = TrainState(step, self.generator)
        self.saved = save_weights_and_state(self.out, self.model, self.mode, self.optimizer, state, self.run_cfg)

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
    display: Display | None = None,
) -> RunResult:
    """Runs the RL loop on the config's task in the mode of `run_cfg.actor.model` and writes the run.

    Everything that can be wrong with the input (output folder, base model, adapter,
    training state) is checked before anything is written to `runner.output_dir`, and the
    folders (and new parents) a refused run created are removed: a run that fails before
    its first step leaves the disk as it found it.

    A resume run in its own folder (`output_dir` holding the adapter at `lora_path`, or the
    model at `model_path` in full mode: `train_state.continues_in_place`) continues that run
    in place: no `runner.overwrite` needed, `metrics.jsonl` keeps the earlier steps up to
    the one it continues from (the training state's step, else the last logged one) and the
    new steps are numbered on; `curves.png` and the summary's rewards cover the whole run.

    Args:
        run_cfg: the validated run config.
        on_step: called with each step's metrics record (after it is written).
        log: where progress lines go.
        display: what shows the progress and the summary (None: nothing).

    Returns:
        The output folder, whether Ctrl-C or SIGTERM stopped the run (after the step it
        came in and one save on every rank), what was saved, and the summary.

    Raises:
        ConfigError: bad `model_path`, or a task that does not fit the model.
        AdapterError: resume mode without a usable adapter at `lora_path`.
        UsageError: an output folder holding results (without `runner.overwrite`) or not
            writable, a device that is not there, a training state that does not fit.
    """
    cfg = run_cfg.runner
    try:
        device = parallel.resolve_device(cfg.device, "runner.device")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    shown = display if display is not None and cfg.progress else Display()
    if cfg.distributed == "none":
        return _train(run_cfg, on_step, log, shown, device)
    try:  # under torchrun: join the group; rank 0 alone prints and writes
        device = parallel.init_distributed("nccl" if device.type == "cuda" else "gloo").device
    except RuntimeError as exc:
        raise UsageError(f"runner.distributed={cfg.distributed!r}: {exc}") from None
    try:
        main = parallel.is_main_process()
        result = _train(run_cfg, on_step, log if main else _quiet, shown if main else Display(), device)
        if isinstance(result.model, DistributedDataParallel):  # the actor, not the wrapper (`shutdown_distributed`)
            result.model = result.model.module
        return result
    finally:
        parallel.shutdown_distributed()


def _quiet(message: str) -> None:
    """The `log` of ranks other than 0."""


def _train(run_cfg: RunConfig, on_step, log, display: Display, device: torch.device) -> RunResult:
    cfg, algo = run_cfg.runner, run_cfg.algorithm
    check_distributed(cfg)
    check_rollout_weights(run_cfg)
    in_place = continues_in_place(run_cfg)
    out = check_output_dir(cfg.output_dir, cfg.overwrite or in_place)
    world = parallel.get_world_size()
    if getattr(algo, "batch_size", world) % world:
        raise UsageError(f"algorithm.batch_size={algo.batch_size} cannot be split over {world} ranks; use a multiple of {world}")
    new_base = [builtin_base_dir(run_cfg)] if run_cfg.actor.model.model_path is None else []
    parallel.barrier()  # every rank has checked the folder before rank 0 writes into it
    with num_threads(cfg.num_threads):
        with removed_on_error(out, *new_base, active=parallel.is_main_process()):  # a refused run leaves nothing
            session = _session(run_cfg, out, in_place, log, device)
        return _run(session, on_step, log, display)


def _session(run_cfg: RunConfig, out: str, in_place: bool, log, device: torch.device) -> Session:
    """Builds the actor, task, optimizer and streams, and restores the training state."""
    cfg, algo = run_cfg.runner, run_cfg.algorithm
    with parallel.main_process_first():  # rank 0 builds and caches the built-in base
        model = build_actor(run_cfg, log=log).to(device)
    learner = learner_for(algo)
    task = build_task(run_cfg, model)
    if learner.uses_value_head:
        attach_value_head(model, run_cfg, task.family)
    reference = Reference(model, run_cfg.actor.model.mode)  # full mode copies the plain model
    heads = [VALUE_HEAD] if learner.uses_value_head else []  # called on the hidden states, outside forward
    model = parallel.wrap_actor(model, cfg.distributed, heads)  # FSDP2 in place, or the DDP wrapper
    params = [p for p in model.parameters() if p.requires_grad]
    # The multi-tensor (foreach) AdamW: a few kernels for all parameters instead of a loop
    # over them. Not `fused=True`: on CPU (torch 2.13) the fused kernel updates the
    # parameters without bumping their version counters, which the grouped siblings'
    # stacked-A cache and merged()'s exact store rely on (a stale cache changed the policy).
    optimizer = torch.optim.AdamW(params, lr=algo.lr, weight_decay=algo.weight_decay, foreach=True)
    seeds = RunSeeds(cfg.seed, parallel.get_rank())
    # This rank's scenes and actions; a learner (PPO) or task (text) whose ranks play shares
    # of one rollout draws them from rank 0's stream on every rank.
    shared = learner.shares_sampling_stream or task.shares_sampling_stream
    generator = (RunSeeds(cfg.seed) if shared else seeds).generator("sampling")
    seeds.seed_global()  # dropout and anything else on torch's default generator
    task.fixed_shapes = cfg.compile  # a compiled actor sees one shape: it compiles once
    session = Session(run_cfg, model, model, task, optimizer, generator, reference, device, out, learner=learner)
    state_dir = find_train_state(run_cfg) if cfg.resume_train_state else None
    if state_dir is not None:
        session.start_step = load_train_state(state_dir, model, optimizer, generator, algo)
        log(f"continuing from {state_dir} (optimizer, RNG) at step {session.start_step}")
    if in_place:
        session.history = _history(out, None if state_dir is None else session.start_step)
        if state_dir is None and session.history:  # no training state: number on from the log
            session.start_step = session.history[-1]["step"]
    session.task.measure_levels(base_report(run_cfg), lambda: load_base(run_cfg, create=False))
    if cfg.compile:
        session.forward_model = compile_actor(model, dynamic=False)  # fixed shapes: one graph per state
    return session


def _history(out: str, last_step: int | None) -> list[dict[str, Any]]:
    """The records of `out/metrics.jsonl` up to `last_step` (all when None): the steps a run
    continued in place keeps. Steps logged after its training state was saved are dropped."""
    path = os.path.join(out, "metrics.jsonl")
    records = read_metrics(path) if os.path.isfile(path) else []
    return [r for r in records if last_step is None or r["step"] <= last_step]


def _example_forward(session: Session) -> Callable[[], object]:
    """One forward of the actor on the task's example batch (what `RolloutWeights` times)."""
    x = session.task.example_inputs().to(session.device)
    return lambda: session.task.family.logits(session.forward_model, x)


def _policy(session: Session) -> ActorPolicy:
    """The actor as the step's policy: through the compiled wrapper when there is one."""
    head = getattr(unwrap_model(session.model), VALUE_HEAD, None)
    return ActorPolicy(session.forward_model, session.task.family, session.task.action_ids.to(session.device),
                       session.run_cfg.algorithm.temperature, head)


def _run(session: Session, on_step: Callable[[dict[str, Any]], None] | None, log: Callable[[str], None],
         display: Display) -> RunResult:
    cfg, out = session.run_cfg.runner, session.out
    main = parallel.is_main_process()
    if main:
        os.makedirs(out, exist_ok=True)
        remove_stale_staging(out)  # left by a rank 0 killed while saving (SIGKILL)
        write_text_atomic(os.path.join(out, "config.yaml"), yaml.safe_dump(_resolved(session.run_cfg), sort_keys=False))
    name = os.path.basename(out)
    log(f"{name}: mode {session.mode}, {trainable_summary(session.model)}; {session.task.describe()}")
    metrics = MetricsWriter(os.path.join(out, "metrics.jsonl"), session.history) if main else None
    display.start(f"{name} ({session.mode})", cfg.steps, session.start_step + 1)
    records: list[dict[str, Any]] = []
    policy = _policy(session)
    rollouts = RolloutWeights(session.model, cfg.rollout_weights, unmerged_only(session.run_cfg), log)
    flag = Interrupt(abort_on_repeat=cfg.distributed == "none")
    memory = MemoryReleaser()  # resident size flat over iterations of changing sizes (glibc)
    step = session.start_step
    try:
        with catch_signals(flag):
            for i in range(cfg.steps):
                if flag.agreed():  # every rank stops after the same step
                    break
                step = session.start_step + i + 1
                for group in session.optimizer.param_groups:
                    group["lr"] = lr_at(session.run_cfg.algorithm, cfg.steps, i)
                stats = rl_step(session.model, policy, session.learner, session.task, session.reference,
                                session.optimizer, session.run_cfg, session.generator, session.device,
                                fixed_rows=cfg.compile, rollout_context=rollouts.context)
                stats["rollout_merged"] = float(rollouts.merged)
                if rollouts.choice is None:  # auto: measured once, after the first rollout
                    session.model.eval()
                    rollouts.decide(_example_forward(session), int(stats["rollout_forwards"]))
                memory.after_iteration()
                stats = reduce_step_stats(stats)  # over ranks
                record = {"step": step, **stats, "chance_reward": session.task.chance_reward,
                          **getattr(session.task, "levels", {}),
                          "lr": session.optimizer.param_groups[0]["lr"]}
                records.append(record)
                if metrics is not None:
                    metrics.write(record)
                display.step(i + 1, record)
                if on_step is not None:
                    on_step(record)
                if cfg.save_every and step % cfg.save_every == 0 and i + 1 < cfg.steps:
                    session.save(step)
            flag.agreed()  # a signal during the last step: every rank reports it alike
            session.save(step)
    finally:
        display.stop()
        if metrics is not None:
            metrics.close()
    return _finish(session, records, flag, log, display)


def _resolved(run_cfg: RunConfig) -> dict[str, Any]:
    """The config as run, with the base folder made explicit (what `merge` reads back)."""
    data = run_cfg.model_dump(mode="json")
    if run_cfg.actor.model.model_path is None:
        data["runner"]["base_dir"] = os.path.dirname(base_path(run_cfg))
    return data


def _finish(session: Session, records: list[dict[str, Any]], flag: Interrupt, log: Callable[[str], None],
            display: Display) -> RunResult:
    cfg, out = session.run_cfg.runner, session.out
    interrupted = flag.requested
    whole = session.history + records  # the whole run when continued in place
    rewards = [r["reward_mean"] for r in whole]
    times = [r["step_time_s"] for r in records[1:]] or [r["step_time_s"] for r in records]
    counts = trainable_summary(session.model)
    peak, peak_kind = peak_memory_mb(session.device)
    summary = {
        "mode": session.mode,
        "output_dir": out,
        "base": base_path(session.run_cfg),
        "lora_path": session.run_cfg.actor.model.lora_path,
        "steps_run": len(records),
        "history_steps": len(whole),  # steps in metrics.jsonl (more than steps_run when continued in place)
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
    if records and "success_rate" in records[0]:  # multi-step tasks
        successes = [r.get("success_rate", float("nan")) for r in whole]
        summary.update(first_success=_mean(successes[:SUMMARY_WINDOW]), final_success=_mean(successes[-SUMMARY_WINDOW:]),
                       env_steps_per_s=_mean([r["env_steps_per_s"] for r in records]))
    result = RunResult(out, interrupted, summary, session.model, flag.signal, list(session.saved), parallel.is_main_process())
    if not result.is_main:
        return result
    note = plot_curves(whole, os.path.join(out, "curves.png"), os.path.basename(out)) if cfg.plot else "runner.plot is false"
    summary["curves"] = None if note else os.path.join(out, "curves.png")
    if note:
        log(f"curves.png not written: {note}")
    write_json_atomic(os.path.join(out, "summary.json"), summary)
    result.saved += [os.path.join(out, n) for n in ("metrics.jsonl", "summary.json", "curves.png") if n != "curves.png" or not note]
    display.summary(summary)
    return result
