"""`task.kind: gym`: your own gymnasium environment, from `task.entry`.

`task.entry: "package.module:make_env"` names a function with no arguments that returns
`(env, adapter)`: a fresh `gymnasium.Env` with a `Discrete(K)` action space, and its
observation adapter (the protocol is in `lora_runtime.rl.tasks.episodic` and the README).
It is called once per environment (`task.num_envs` times); the first call's adapter is used.
The module is imported as `import package.module` (it must be importable: installed, or on
`PYTHONPATH` / the working directory).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from lora_runtime.config import ConfigError, GymSection, RunConfig
from lora_runtime.rl.tasks.episodic import EpisodicTask

REQUIRED = ("vocabulary", "words")


def load_entry(entry: str) -> Callable[[], tuple[Any, Any]]:
    """Imports `package.module:function` and returns the function.

    Raises:
        ConfigError: the module cannot be imported or has no such callable (names `task.entry`).
    """
    module_name, _, attr = entry.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        # `python -m` puts the working directory on the path, a console script (`lora-runtime
        # train`) its own folder: the entry module in the working directory is found either way
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure of user code is a config problem
        raise ConfigError(
            f"task.entry={entry!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); make it "
            "importable (pip install it, or run from the folder that holds it / set PYTHONPATH)"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"task.entry={entry!r}: module {module_name!r} has no function {attr!r}")
    return fn


def make_gym_env(entry: str) -> tuple[Any, Any]:
    """Calls the entry point once and checks what it returned: `(env, adapter)`.

    Raises:
        ConfigError: not a pair of a gymnasium.Env and an adapter with `vocabulary` and `words`.
    """
    import gymnasium as gym  # deferred: optional dependency

    result = load_entry(entry)()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], gym.Env)):
        raise ConfigError(
            f"task.entry={entry!r} returned {type(result).__name__}; it must return (env, adapter): a gymnasium.Env "
            "and an observation adapter (see the README, 'Your own environment')"
        )
    missing = [name for name in REQUIRED if not hasattr(result[1], name)]
    if missing:
        raise ConfigError(f"task.entry={entry!r}: the adapter {type(result[1]).__name__} lacks {', '.join(missing)}")
    return result


class GymTask(EpisodicTask):
    """`task.kind: gym`: `task.num_envs` environments from the entry point `task.entry`."""

    section = GymSection

    @classmethod
    def check(cls, run_cfg: RunConfig) -> None:
        super().check(run_cfg)
        load_entry(run_cfg.task.entry)

    @classmethod
    def environment(cls, run_cfg: RunConfig, image_size: int | None) -> tuple[str, Callable[[], Any], Any]:
        entry = run_cfg.task.entry
        _, adapter = make_gym_env(entry)
        return entry, lambda: make_gym_env(entry)[0], adapter
