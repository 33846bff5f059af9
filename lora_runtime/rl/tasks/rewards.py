"""Reward functions of the text task, with TRL's contract, and the prompt sets they score.

A reward function is a plain function of lists (TRL's `GRPOTrainer` contract, so a TRL
user's function works unchanged):

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

`completions[i]` answers `prompts[i]`; every other column of the dataset (`answer`, ...)
comes as a keyword argument, a list aligned with the completions. `task.reward` names
them as "package.module:function" or "path/to/file.py:function", each with a weight; the
task's reward of a completion is the weighted sum. Every failure is a `RewardError` that
names the function (no traceback): it raised, returned the wrong number of values, a
non-number or NaN.

Datasets are JSONL files: one JSON object a line with a `prompt` string (`load_jsonl`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lora_runtime.config import RewardSpec
from lora_runtime.errors import ConfigError, RewardError


@dataclass
class Reward:
    """One loaded reward function and its weight."""

    name: str  # as written in task.reward
    fn: Callable[..., Any]
    weight: float


def load_reward(spec: RewardSpec, key: str = "task.reward") -> Reward:
    """Imports `spec.function` ("package.module:function" or "path/to/file.py:function").

    Raises:
        RewardError: the module or file is not there, fails to import, or has no such
            callable; the message names the function as written.
    """
    where, _, name = spec.function.rpartition(":")
    what = f"{key}: {spec.function!r}"
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = os.path.abspath(where)
        if not os.path.isfile(path):
            raise RewardError(f"{what}: no such file {path}")
        mod_name = f"lora_runtime_reward_{abs(hash(path))}"
        module = sys.modules.get(mod_name)
        if module is None:
            loader = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(loader)
            try:
                loader.loader.exec_module(module)
            except Exception as exc:  # noqa: BLE001 (any error of the user's file)
                raise RewardError(f"{what}: importing {path} failed: {type(exc).__name__}: {exc}") from None
            sys.modules[mod_name] = module
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            raise RewardError(f"{what}: no module named {exc.name!r} (is it on PYTHONPATH?)") from None
        except Exception as exc:  # noqa: BLE001 (any error of the user's module)
            raise RewardError(f"{what}: importing {where} failed: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"{what}: {where} has no function {name!r}")
    return Reward(spec.function, fn, spec.weight)


def call_reward(reward: Reward, prompts: Sequence[str], completions: Sequence[str],
                columns: dict[str, list[Any]]) -> list[float]:
    """`reward.fn(prompts, completions, **columns)` as a checked list of floats.

    Raises:
        RewardError: the function raised (its message), or returned something other than
            `len(completions)` finite-or-infinite numbers (NaN and non-numbers refused).
    """
    try:
        values = reward.fn(prompts=list(prompts), completions=list(completions), **columns)
    except Exception as exc:  # noqa: BLE001 (the user's function: its message is shown)
        raise RewardError(f"reward function {reward.name} raised {type(exc).__name__}: {exc}") from None
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward function {reward.name} returned {type(values).__name__}, expected a list of "
                          f"{len(completions)} numbers (one per completion)") from None
    if len(values) != len(completions):
        raise RewardError(f"reward function {reward.name} returned {len(values)} values for {len(completions)} "
                          "completions; return one number per completion")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise RewardError(f"reward function {reward.name} returned {v!r} ({type(v).__name__}) at index {i}; "
                              "expected a number (None is not allowed)")
        f = float(v)
        if math.isnan(f):
            raise RewardError(f"reward function {reward.name} returned NaN at index {i} (completion "
                              f"{completions[i]!r}); return a number")
        out.append(f)
    return out


def total_rewards(rewards: Sequence[Reward], prompts: Sequence[str], completions: Sequence[str],
                  columns: dict[str, list[Any]]) -> tuple[list[float], list[list[float]]]:
    """The weighted sum per completion and each function's values (in `rewards` order)."""
    each = [call_reward(r, prompts, completions, columns) for r in rewards]
    total = [sum(r.weight * vals[i] for r, vals in zip(rewards, each, strict=True)) for i in range(len(completions))]
    return total, each


def load_jsonl(path: str, key: str) -> list[dict[str, Any]]:
    """The rows of a JSONL prompt set.

    Raises:
        ConfigError: a missing file, a line that is not a JSON object, a row without a
            `prompt` string, or no rows; the message names the file and line.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"{key}={path!r}: no such file; point it at a JSONL file (one {{\"prompt\": ...}} a line)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{number}: expected a JSON object with a 'prompt' key, got {type(row).__name__}")
            if not isinstance(row.get("prompt"), str):
                found = "no 'prompt' key" if "prompt" not in row else f"'prompt' is {type(row['prompt']).__name__}"
                raise ConfigError(f"{path}:{number}: {found}; each line needs a 'prompt' string")
            rows.append(row)
    if not rows:
        raise ConfigError(f"{key}={path!r}: the dataset is empty; it needs at least one {{\"prompt\": ...}} line")
    return rows


def columns_of(rows: Sequence[dict[str, Any]], repeats: int = 1) -> dict[str, list[Any]]:
    """Every column but `prompt` as a list, each row repeated `repeats` times (None where a
    row lacks the column)."""
    names = sorted({k for r in rows for k in r if k != "prompt"})
    return {n: [r.get(n) for r in rows for _ in range(repeats)] for n in names}


# Built-in reward functions (TRL's signature).


def _number(text: str) -> str:
    """The leading answer of a completion: up to the first whitespace, stripped."""
    parts = text.strip().split()
    return parts[0] if parts else ""


def exact_answer(prompts: list[str], completions: list[str], answer: list[Any], **_: Any) -> list[float]:
    """1.0 where the completion's first word equals the `answer` column, else 0.0."""
    return [1.0 if _number(c) == str(a).strip() else 0.0 for c, a in zip(completions, answer, strict=True)]


def digit_share(prompts: list[str], completions: list[str], answer: list[Any], **_: Any) -> list[float]:
    """A shaped reward: the share of the answer's characters found at their place in the
    completion (0..1), so a model far from right still sees differences between samples."""
    out = []
    for c, a in zip(completions, answer, strict=True):
        a, c = str(a).strip(), _number(c)
        hits = sum(x == y for x, y in zip(a, c, strict=False))
        out.append(hits / max(len(a), len(c), 1))
    return out
