"""The task plug-in interface: what the trainer, the CLI and the benchmark ask of a task.

A task is built from its own config section (`lora_runtime.config.task`) for one actor (its
model family decides how observations become model inputs), gives the built-in base its
warm start, rolls out and scores a batch (`collect` -> `Experience`), knows its chance
level, and may evaluate a model greedily on held-out seeds. Register a new one with
`lora_runtime.rl.tasks.register_task`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lora_runtime.config import ConfigError, RunConfig, TaskSection
from lora_runtime.rl.models import ModelFamily, ModelInputs, build_tiny_vla
from lora_runtime.rl.policy import ActorPolicy


@dataclass
class Experience:
    """One step's rollouts as the update reads them: `N` rows of `A` action tokens each.

    GRPO's view (`collect`): the rows come from `E` rollouts (episodes or sequences) in
    groups of `group_size` contiguous ones, `episode` maps rows to rollouts. PPO's view
    (`collect_steps`): the rows are a `[T, M]` grid of environment steps, t-major.
    """

    inputs: ModelInputs  # N rows (on the rollout's device or CPU)
    positions: torch.Tensor  # [N, A] the prompt positions whose logits chose each action token
    actions: torch.Tensor  # [N, A] long, action index in [0, K)
    old_logp: torch.Tensor  # [N, A] log-probs under the sampling policy
    stats: dict[str, float] = field(default_factory=dict)  # the rollout's metrics (reward_mean, ...)
    samples: int = 0  # what samples_per_s counts: environment steps or sequences
    episode: torch.Tensor | None = None  # [N] long, the rollout of each row (GRPO)
    returns: torch.Tensor | None = None  # [E] float, each rollout's return (GRPO)
    group_size: int = 1
    drop_flat_groups: bool = False  # GRPO may leave out groups whose returns are all equal (DAPO)
    values: torch.Tensor | None = None  # [T, M] each state's value at rollout time (PPO)
    next_values: torch.Tensor | None = None  # [T, M] the value of the state reached (PPO)
    rewards: torch.Tensor | None = None  # [T, M] (PPO)
    terminated: torch.Tensor | None = None  # [T, M] bool (PPO)
    ended: torch.Tensor | None = None  # [T, M] bool, terminated or truncated (PPO)
    mask: torch.Tensor | None = None  # [N, A] float, 1 for the action tokens that count (text: up to EOS); None: all


class Task:
    """Base class of the task plug-ins (`reach.ReachTask`, `episodic.EpisodicTask`, ...).

    Class attributes:
        section: the config section class; its `kind` is the registry key.
        splits_over_ranks: the rollouts of one step can be split over torchrun ranks (all
            ranks then take the same number of forward passes).
        held_out_eval: `evaluate` measures greedy results on held-out seeds.
        steps_environments: `collect_steps` steps environments (what PPO needs).

    Instance attributes (set by `build`):
        family: the actor's model family.
        action_ids: `[K]` vocabulary ids of the action tokens.
        chance_reward: the random policy's expected return (NaN until measured).
        levels: reference success rates written into every metrics line.
    """

    section: ClassVar[type[TaskSection]]
    builtin_prefix: ClassVar[str] = "tiny-vla"  # the cached built-in base's folder name starts with it
    splits_over_ranks: ClassVar[bool] = True
    # Under torchrun, every rank draws a step's seeds or prompts and its sampling noise from
    # one shared stream and plays its share (the ranks together play one process's rollout).
    shares_sampling_stream: ClassVar[bool] = False
    split_hint: ClassVar[str] = "runner.distributed: none"
    held_out_eval: ClassVar[bool] = False
    steps_environments: ClassVar[bool] = False

    family: ModelFamily
    action_ids: torch.Tensor
    chance_reward: float = float("nan")
    levels: dict[str, float]

    @classmethod
    def check(cls, run_cfg: RunConfig) -> None:
        """Checks what is cheap to check before any work (ids, entry points, distribution).

        Raises:
            ConfigError: the message names the key.
        """
        if run_cfg.algorithm.name == "ppo" and not cls.steps_environments:
            raise ConfigError(cls._no_steps())
        if not cls.splits(run_cfg) and run_cfg.runner.distributed != "none":
            raise ConfigError(
                f"runner.distributed={run_cfg.runner.distributed!r} is not supported with task.kind: "
                f"{run_cfg.task.kind} and algorithm.name: {run_cfg.algorithm.name}: ranks play rollouts of different "
                f"lengths, so their collectives would not line up; use {cls.split_hint}"
            )

    @classmethod
    def splits(cls, run_cfg: RunConfig) -> bool:
        """Whether this run's rollouts split over torchrun ranks (`splits_over_ranks` by default)."""
        return cls.splits_over_ranks

    @classmethod
    def builtin_model(cls, run_cfg: RunConfig) -> nn.Module:
        """The built-in actor before its warm start (`actor.model.model_path: null`): the
        TinyVLA sized by `actor.builtin`; a task whose actor is another model overrides it."""
        return build_tiny_vla(run_cfg.actor.builtin)

    @classmethod
    def build(cls, run_cfg: RunConfig, model: nn.Module, family: ModelFamily) -> Task:
        """The task sized for `model`.

        Raises:
            ConfigError: a task that does not fit the model.
        """
        raise NotImplementedError

    @property
    def title(self) -> str:
        """A short name for tables (the level id, the entry point)."""
        return self.section.model_fields["kind"].default

    def describe(self) -> str:
        """One line for the run's log."""
        raise NotImplementedError

    def example_inputs(self) -> ModelInputs:
        """A small batch of inputs (CPU), for sibling grouping and export."""
        raise NotImplementedError

    def warm_start(self, model: nn.Module, run_cfg: RunConfig, log: Callable[[str], None]) -> dict[str, Any]:
        """Trains the freshly initialised built-in actor in place; returns the report stored
        with the base (`config.json`, key `pretrain`)."""
        raise NotImplementedError

    def collect(self, policy: ActorPolicy, num_groups: int, group_size: int, generator: torch.Generator) -> Experience:
        """Samples `num_groups` seeds from `generator`, `group_size` rollouts each, scored
        (GRPO). `policy` runs on the device of its `action_ids`."""
        raise NotImplementedError

    def collect_steps(self, policy: ActorPolicy, steps: int, generator: torch.Generator) -> Experience:
        """`steps` steps of every environment, with the policy's values (PPO).

        Raises:
            ConfigError: the task has no environments to step (one-step tasks).
        """
        raise ConfigError(self._no_steps())

    @classmethod
    def _no_steps(cls) -> str:
        return (f"algorithm.name: ppo needs a multi-step task (task.kind: babyai or gym); task.kind: "
                f"{cls.section.model_fields['kind'].default} has no environment steps; use algorithm.name: grpo")

    def measure_levels(self, base_report: dict[str, Any] | None, base: Callable[[], nn.Module]) -> None:
        """Fills `chance_reward` and `levels` (the random policy's, the warm start's).

        Args:
            base_report: the built-in base's warm-start report, or None for a model folder.
            base: loads the base model (for a level the report lacks).
        """

    def evaluate(self, model: nn.Module, episodes: int | None, device: torch.device | str = "cpu") -> dict[str, Any]:
        """Greedy results on held-out seeds (`lora-runtime eval`).

        Raises:
            ConfigError: the task has no held-out evaluation.
        """
        raise ConfigError(f"task.kind: {self.section.model_fields['kind'].default} has no held-out evaluation; "
                          "its reward is in the run's metrics.jsonl")
