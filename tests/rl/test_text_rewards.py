"""The text task's reward-function contract (TRL's signature: columns as lists, weights,
errors that name the function) and its dataset errors (file and line named)."""

from __future__ import annotations

import math

import pytest

from lora_runtime.config import ConfigError, RewardSpec, validate_config
from lora_runtime.rl.tasks.rewards import (
    RewardError,
    call_reward,
    columns_of,
    digit_share,
    exact_answer,
    load_jsonl,
    load_reward,
    total_rewards,
)

SEEN: dict = {}


def recording(prompts, completions, answer, level, **kwargs):
    """Records what it was called with; 1.0 where the completion is the answer."""
    SEEN.update(prompts=prompts, completions=completions, answer=answer, level=level, extra=kwargs)
    return [float(c == a) for c, a in zip(completions, answer, strict=True)]


def raising(prompts, completions, **_):
    raise KeyError("no such column: 'solution'")


def short(prompts, completions, **_):
    return [1.0]


def nan(prompts, completions, **_):
    return [float("nan")] * len(completions)


def words(prompts, completions, **_):
    return ["good"] * len(completions)


def nones(prompts, completions, **_):
    return [None] * len(completions)


def scalar(prompts, completions, **_):
    return 1.0


def _reward(name: str, weight: float = 1.0):
    return load_reward(RewardSpec(function=f"{__name__}:{name}", weight=weight))


def test_columns_come_as_lists_aligned_with_the_completions():
    rows = [{"prompt": "1+1=", "answer": "2", "level": 1}, {"prompt": "2+2=", "answer": "4", "level": 2}]
    total, each = total_rewards([_reward("recording")], ["1+1=", "1+1=", "2+2=", "2+2="], ["2", "3", "4", "4"],
                                columns_of(rows, 2))
    assert SEEN["answer"] == ["2", "2", "4", "4"] and SEEN["level"] == [1, 1, 2, 2]
    assert SEEN["prompts"] == ["1+1=", "1+1=", "2+2=", "2+2="] and SEEN["extra"] == {}
    assert total == [1.0, 0.0, 1.0, 1.0] and each == [total]


def test_rewards_are_summed_with_their_weights():
    rewards = [_reward("recording", 2.0), load_reward(RewardSpec(function="lora_runtime.rl.tasks.rewards:digit_share",
                                                                  weight=0.5))]
    rows = [{"prompt": "9+9=", "answer": "18", "level": 3}]
    total, each = total_rewards(rewards, ["9+9="], ["17"], columns_of(rows))
    assert each == [[0.0], [0.5]] and total == [0.25]


def test_a_file_path_reward_loads(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def length(prompts, completions, **kw):\n    return [len(c) for c in completions]\n")
    reward = load_reward(RewardSpec(function=f"{path}:length"))
    assert call_reward(reward, ["p"], ["abc"], {}) == [3.0]


@pytest.mark.parametrize(("name", "message"), [
    ("raising", r"reward function \S*test_text_rewards:raising raised KeyError: .no such column: 'solution'"),
    ("short", r"returned 1 values for 2 completions"),
    ("nan", r"returned NaN at index 0"),
    ("words", r"returned 'good' \(str\) at index 0; expected a number"),
    ("nones", r"returned None \(NoneType\) at index 0"),
    ("scalar", r"returned float, expected a list of 2 numbers"),
])
def test_a_bad_reward_function_is_named(name, message):
    with pytest.raises(RewardError, match=message) as info:
        call_reward(_reward(name), ["a", "b"], ["x", "y"], {})
    assert info.value.__cause__ is None


@pytest.mark.parametrize(("function", "message"), [
    ("no_such_package.rewards:f", r"no module named 'no_such_package'"),
    ("lora_runtime.rl.tasks.rewards:missing", r"has no function 'missing'"),
    ("/nowhere/r.py:f", r"no such file /nowhere/r.py"),
])
def test_an_unknown_reward_path_is_named(function, message):
    with pytest.raises(RewardError, match=message):
        load_reward(RewardSpec(function=function))


def test_the_config_refuses_a_reward_without_a_function_name():
    raw = {"actor": {"model": {"is_lora": True}}, "task": {"kind": "text", "reward": "my_rewards"}}
    with pytest.raises(ConfigError, match="task.reward.0.function: got 'my_rewards': expected 'package.module:function'"):
        validate_config(raw)
    cfg = validate_config({**raw, "task": {"kind": "text", "reward": "pkg.mod:fn"}})
    assert [(r.function, r.weight) for r in cfg.task.reward] == [("pkg.mod:fn", 1.0)]


def test_builtin_rewards():
    assert exact_answer(["1+1="], [" 2 ", "3"][:1], ["2"]) == [1.0]
    assert exact_answer(["1+1=", "1+1="], ["22", ""], [2, 2]) == [0.0, 0.0]
    assert digit_share(["a"], ["19"], ["18"]) == [0.5]
    assert math.isclose(digit_share(["a"], ["1"], ["18"])[0], 0.5)


@pytest.mark.parametrize(("text", "message"), [
    ('{"prompt": "a"}\nnot json\n', r"data.jsonl:2: not valid JSON"),
    ('{"prompt": "a"}\n{"answer": "1"}\n', r"data.jsonl:2: no 'prompt' key; each line needs a 'prompt' string"),
    ('{"prompt": 3}\n', r"data.jsonl:1: 'prompt' is int"),
    ('[1, 2]\n', r"data.jsonl:1: expected a JSON object"),
    ("\n\n", r"the dataset is empty"),
])
def test_a_bad_dataset_line_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_jsonl(str(path), "task.dataset")


def test_a_missing_dataset_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"task.dataset=.*nope.jsonl.: no such file"):
        load_jsonl(str(tmp_path / "nope.jsonl"), "task.dataset")
