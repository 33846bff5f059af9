"""The `task` section: one shape per `task.kind`, each kind's own keys only.

Each task kind has a section class (a `TaskSection` whose `kind` is a `Literal`); the run
file's `task` mapping is validated against the class its `kind` names. The built-in kinds are
registered here; a task plug-in registers its own with `register_task_section` (the RL
floor's `lora_runtime.rl.tasks.register_task` does it for you). No torch here.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, StrictBool, StrictInt, field_validator, model_validator

from lora_runtime.config.base import ConfigError, Strict

DEFAULT_KIND = "reach"


class TaskSection(Strict):
    """The keys every task section has. Subclasses add their own and fix `kind`.

    `RL_ONLY` names the keys the built-in base's warm start does not depend on: the rest
    of the section is hashed into the cached base's folder name.
    """

    kind: str
    RL_ONLY: ClassVar[tuple[str, ...]] = ()

    def base_recipe(self) -> dict[str, Any]:
        """The keys the built-in base (warm start) depends on."""
        return self.model_dump(exclude=set(self.RL_ONLY))


class ReachSection(TaskSection):
    """`kind: reach`: the synthetic one-step reach task (`lora_runtime.rl.tasks.reach`).

    A `grid x grid` scene holds `num_objects` objects of different colours (out of
    `num_colors`); the instruction names one colour; the action tokens (row, column) must
    point at its cell. Reward 1 on the cell, else 0; chance is `1 / grid**2`.
    """

    kind: Literal["reach"] = "reach"
    grid: StrictInt = Field(4, ge=2, le=16)
    num_objects: StrictInt = Field(3, ge=1)
    num_colors: StrictInt = Field(4, ge=1, le=8)
    noise: float = Field(0.05, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _objects_fit(self) -> ReachSection:
        if self.num_objects > self.num_colors:
            raise ValueError(
                f"num_objects={self.num_objects} > num_colors={self.num_colors}: every object needs its own colour"
            )
        if self.num_objects > self.grid * self.grid:
            raise ValueError(f"num_objects={self.num_objects} does not fit a {self.grid}x{self.grid} grid")
        return self


class EpisodicSection(TaskSection):
    """The keys of the multi-step (gymnasium) tasks: environments stepped together, the
    warm start's expert episodes, the held-out evaluation."""

    num_envs: StrictInt = Field(16, ge=1, le=1024)
    max_episode_steps: StrictInt | None = Field(None, ge=1)
    bc_episodes: StrictInt = Field(400, ge=1)
    eval_episodes: StrictInt = Field(200, ge=1)
    prev_action: StrictBool = False  # the prompt ends with the previous action's token
    # Step the environments in a child process, one half while the policy acts for the other
    # (GRPO's episodes, PPO's rollouts, evaluation; `rl.tasks.overlapped`): faster when a core is free.
    overlap_envs: StrictBool = False
    RL_ONLY: ClassVar[tuple[str, ...]] = ("num_envs", "eval_episodes", "overlap_envs")


class BabyAISection(EpisodicSection):
    """`kind: babyai`: the BabyAI / MiniGrid level `env_id` (`lora_runtime.rl.tasks.babyai`)."""

    kind: Literal["babyai"] = "babyai"
    env_id: str = "BabyAI-GoToObj-v0"


class GymSection(EpisodicSection):
    """`kind: gym`: your own gymnasium environment from `entry` ("package.module:function"
    returning `(env, adapter)`, see `lora_runtime.rl.tasks.gym`)."""

    kind: Literal["gym"] = "gym"
    entry: str

    @field_validator("entry")
    @classmethod
    def _entry_form(cls, entry: str) -> str:
        if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", entry) is None:
            raise ValueError("expected 'package.module:function', e.g. 'my_envs.cartpole:make_env'")
        return entry


class RewardSpec(Strict):
    """One reward function of `task.reward`: `function` is "package.module:function" or
    "path/to/file.py:function" (TRL's signature), `weight` its weight in the sum."""

    function: str
    weight: float = 1.0

    @field_validator("function")
    @classmethod
    def _function_form(cls, function: str) -> str:
        module, sep, name = function.rpartition(":")
        if not sep or not module.strip() or re.fullmatch(r"[A-Za-z_]\w*", name) is None:
            raise ValueError("expected 'package.module:function' or 'path/to/file.py:function'")
        return function


DEFAULT_REWARDS = ({"function": "lora_runtime.rl.tasks.rewards:exact_answer", "weight": 1.0},)


class TextSection(TaskSection):
    """`kind: text`: a language model answers prompts, scored by reward functions
    (`lora_runtime.rl.tasks.text`).

    `dataset` is a JSONL file (one object a line: a `prompt` string and any other columns,
    passed to the reward functions by name); null: the built-in generated additions
    (`a+b=`, answer column `answer`; `num_prompts` of them, numbers below `max_operand`).
    `eval_dataset` holds the held-out prompts; without it the last `eval_fraction` of the
    dataset's lines are held out (never trained on). `reward`: functions with TRL's
    signature `fn(prompts, completions, **columns) -> list[float]`, summed with weights.
    Sampling: `max_new_tokens` tokens at most (stop at EOS), `top_p` nucleus sampling, the
    temperature of `algorithm.temperature`.
    """

    kind: Literal["text"] = "text"
    dataset: str | None = None
    eval_dataset: str | None = None
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    reward: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(**r) for r in DEFAULT_REWARDS], min_length=1)
    max_new_tokens: StrictInt = Field(8, ge=1)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    eval_prompts: StrictInt | None = Field(None, ge=1)  # held-out prompts `evaluate` reads (None: all)
    # The built-in generated additions (dataset: null; the built-in base's warm start trains
    # on them for actor.builtin.pretrain_steps).
    num_prompts: StrictInt = Field(2000, ge=2)
    max_operand: StrictInt = Field(50, ge=2)
    RL_ONLY: ClassVar[tuple[str, ...]] = ("dataset", "eval_dataset", "reward", "max_new_tokens", "top_p",
                                          "eval_prompts")

    @field_validator("reward", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        items = value if isinstance(value, list) else [value]
        return [{"function": v} if isinstance(v, str) else v for v in items]

    @field_validator("dataset", "eval_dataset")
    @classmethod
    def _path_not_blank(cls, path: str | None) -> str | None:
        if path is not None and not path.strip():
            raise ValueError("an empty path is not allowed; use null for none")
        return path

    @model_validator(mode="after")
    def _held_out(self) -> TextSection:
        if self.dataset is not None and self.eval_dataset is None and self.eval_fraction == 0.0:
            raise ValueError("no held-out prompts: set task.eval_dataset or task.eval_fraction > 0")
        return self


_SECTIONS: dict[str, type[TaskSection]] = {}


def register_task_section(section: type[TaskSection]) -> None:
    """Makes `task.kind: <kind>` validate against `section` (its `kind` field's default).

    Raises:
        ValueError: the class has no default `kind`, or another class has that kind.
    """
    kind = section.model_fields["kind"].default
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{section.__name__}: give its kind field a Literal type and a default, e.g. kind: Literal['x'] = 'x'")
    if _SECTIONS.get(kind, section) is not section:
        raise ValueError(f"task kind {kind!r} is already registered by {_SECTIONS[kind].__name__}")
    _SECTIONS[kind] = section


def task_kinds() -> list[str]:
    """The registered task kinds, sorted."""
    return sorted(_SECTIONS)


def section_class(kind: Any) -> type[TaskSection]:
    """The section class of `kind`.

    Raises:
        ConfigError: an unknown kind (the message lists the registered ones).
    """
    if not isinstance(kind, str) or kind not in _SECTIONS:
        raise ConfigError(f"task.kind: got {kind!r}: unknown task kind (allowed: {', '.join(task_kinds())})")
    return _SECTIONS[kind]


for _builtin in (ReachSection, BabyAISection, GymSection, TextSection):
    register_task_section(_builtin)
