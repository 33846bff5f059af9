"""Tasks as plug-ins: one module per task, one registry keyed by `task.kind`.

- `base.py`: the `Task` interface and `Experience` (what a rollout hands the update);
- `reach.py` (+ `reach_warm_start.py`): the synthetic one-step reach task;
- `episodic.py` (+ `episodes.py`): gymnasium environments stepped together, read through an
  observation adapter; `babyai.py` and `gym_entry.py` build them from their sections;
- `text.py` (+ `generation.py`, `rewards.py`, `text_warm_start.py`): a language model answers
  prompts, scored by TRL-signature reward functions;
- `registry.py`: `register_task`, `task_class`, `build_task`.
"""

from lora_runtime.rl.tasks.base import Experience, Task
from lora_runtime.rl.tasks.registry import build_task, register_task, task_class

__all__ = ["Experience", "Task", "build_task", "register_task", "task_class"]
