"""The task registry: `task.kind` -> its `Task` class (and its config section).

Adding a task is one module with a `Task` subclass (whose `section` is its config section)
and one `register_task` call: the trainer, the CLI and the benchmark only ever ask
`task_class(kind)` / `build_task(run_cfg, model)`.
"""

from __future__ import annotations

from torch import nn

from lora_runtime.config import ConfigError, RunConfig, register_task_section, task_kinds
from lora_runtime.rl.models import family_of
from lora_runtime.rl.tasks.babyai import BabyAITask
from lora_runtime.rl.tasks.base import Task
from lora_runtime.rl.tasks.gym_entry import GymTask
from lora_runtime.rl.tasks.reach import ReachTask
from lora_runtime.rl.tasks.text import TextTask

_TASKS: dict[str, type[Task]] = {}


def register_task(task: type[Task]) -> type[Task]:
    """Registers `task` under its section's kind (config validation learns the section too).

    Returns the class, so it can be used as a decorator.

    Raises:
        ValueError: another task has that kind.
    """
    register_task_section(task.section)
    kind = task.section.model_fields["kind"].default
    if _TASKS.get(kind, task) is not task:
        raise ValueError(f"task kind {kind!r} is already registered by {_TASKS[kind].__name__}")
    _TASKS[kind] = task
    return task


def task_class(kind: str) -> type[Task]:
    """The `Task` class of `kind`.

    Raises:
        ConfigError: a kind with a config section but no task (names the registered ones).
    """
    if kind not in _TASKS:
        raise ConfigError(f"task.kind: got {kind!r}: no task is registered for it (allowed: {', '.join(sorted(_TASKS))})")
    return _TASKS[kind]


def build_task(run_cfg: RunConfig, model: nn.Module) -> Task:
    """The task of `run_cfg` sized for `model` (through the model's family).

    Raises:
        ConfigError: a task that does not fit the model, an unknown level or entry point.
    """
    return task_class(run_cfg.task.kind).build(run_cfg, model, family_of(model))


for _task in (ReachTask, BabyAITask, GymTask, TextTask):
    register_task(_task)
assert set(_TASKS) == set(task_kinds()), "every built-in task section has its task"
