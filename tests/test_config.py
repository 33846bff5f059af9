"""Config validation: modes, defaults, and errors that name the file, key and value."""

from __future__ import annotations

import pytest

from lora_runtime.adapters import DEFAULT_TARGETS
from lora_runtime.config import ActorModelConfig, ConfigError, load_config


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "body,mode",
    [
        ("is_lora: True\n    lora_rank: 32\n    lora_path: null", "new"),
        ("is_lora: True\n    lora_rank: 32\n    lora_path: /some/adapter", "resume"),
        ("is_lora: False\n    lora_rank: 32", "full"),
    ],
)
def test_modes_from_the_seed_shape(tmp_path, body, mode):
    cfg = load_config(write(tmp_path, f"actor:\n  model:\n    {body}\n"))
    assert cfg.actor.model.mode == mode
    assert cfg.actor.model.lora_rank == 32


def test_defaults_are_rlinf_compatible():
    m = ActorModelConfig(is_lora=True)
    assert m.lora_rank == 32 and m.lora_alpha is None and m.lora_dropout == 0.0
    assert m.target_modules is None  # null: the adapter layer's defaults, RLinf's list
    assert {"q_proj", "v_proj", "gate_proj", "down_proj", "lm_head"} <= set(DEFAULT_TARGETS)
    assert m.init_lora_weights == "gaussian" and m.use_rslora is False and m.exclude_modules == []


@pytest.mark.parametrize(
    "body,match",
    [
        ("is_lora: True\n    lora_rnak: 8", r"actor.model.lora_rnak: unknown key .*did you mean 'lora_rank'\?"),
        ("is_lora: True\n    lora_rank: 0", r"actor.model.lora_rank: got 0: Input should be greater than or equal to 1"),
        ("is_lora: True\n    lora_rank: '8'", r"actor.model.lora_rank: got '8': Input should be a valid integer"),
        ("is_lora: maybe", r"actor.model.is_lora: got 'maybe': Input should be a valid boolean"),
        ("is_lora: True\n    lora_dropout: 1.5", r"actor.model.lora_dropout: got 1.5: Input should be less than 1"),
        ("is_lora: True\n    init_lora_weights: xavier", r"actor.model.init_lora_weights: got 'xavier'.*'gaussian' or 'kaiming'"),
        ("is_lora: True\n    lora_alpha: -1", r"actor.model.lora_alpha: got -1: Input should be greater than 0"),
        ("is_lora: True\n    target_modules: []", r"actor.model.target_modules: got \[\]"),
        ("lora_rank: 8", r"actor.model.is_lora: required key is missing"),
        (
            "is_lora: False\n    lora_path: runs/x/adapter",
            r"actor.model: is_lora is false \(full fine-tuning\) but lora_path='runs/x/adapter' is set",
        ),
    ],
)
def test_bad_values_name_file_key_and_value(tmp_path, body, match):
    path = write(tmp_path, f"actor:\n  model:\n    {body}\n")
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(write(tmp_path, "actor: [unclosed\n"))
    with pytest.raises(ConfigError, match=r"the file is empty"):
        load_config(write(tmp_path, ""))
    with pytest.raises(ConfigError, match=r"must hold a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match=r"actor: required key is missing"):
        load_config(write(tmp_path, "runner: {}\n"))


def test_overrides(tmp_path):
    path = write(tmp_path, "actor:\n  model:\n    is_lora: True\n    lora_rank: 32\n")
    cfg = load_config(path, ["actor.model.lora_rank=8", "actor.model.lora_path=/a"])
    assert cfg.actor.model.lora_rank == 8 and cfg.actor.model.mode == "resume"
    with pytest.raises(ConfigError, match=r"(?s)with --set actor.model.lora_rnak=8.*actor.model.lora_rnak: unknown key"):
        load_config(path, ["actor.model.lora_rnak=8"])
    with pytest.raises(ConfigError, match=r"--set 'actor.model': expected dotted.key=value"):
        load_config(path, ["actor.model"])
    assert load_config(path).actor.model.lora_rank == 32  # the file itself is untouched


BASE = "actor:\n  model:\n    is_lora: true\n"


def test_the_old_trainer_section_names_each_keys_new_place(tmp_path):
    path = write(tmp_path, BASE + "trainer:\n  lr: 0.1\n  steps: 3\n  group_size: 4\n  stepz: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(str(path)) and "the trainer section was split into algorithm" in text
    assert "trainer.lr -> algorithm.lr" in text and "trainer.steps -> runner.steps" in text
    assert "trainer.group_size -> algorithm.group_size" in text and "unknown keys: trainer.stepz" in text
    with pytest.raises(ConfigError, match=r"trainer.steps -> runner.steps"):
        load_config(write(tmp_path, BASE), ["trainer.steps=3"])  # an old --set too


@pytest.mark.parametrize("task, match", [
    ("kind: babyai\n  grid: 3", r"task.grid: unknown key for task.kind 'babyai' \(allowed: bc_episodes, env_id, "),
    ("kind: reach\n  env_id: X", r"task.env_id: unknown key for task.kind 'reach' \(allowed: grid, kind, noise, "),
    ("kind: reach\n  prev_action: true", r"task.prev_action: unknown key for task.kind 'reach'"),
    ("kind: gym", r"task.entry: required key is missing"),
    ("kind: gym\n  entry: nodots", r"task.entry: got 'nodots': .*'package.module:function'"),
    ("kind: chess", r"task.kind: got 'chess': unknown task kind \(allowed: babyai, .*gym, reach"),  # + plug-ins
    ("kind: reach\n  num_objects: 5", r"task: .*num_objects=5 > num_colors=4"),
])
def test_each_task_kind_has_its_own_keys(tmp_path, task, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, BASE + f"task:\n  {task}\n"))


def test_the_task_section_dumps_its_own_keys_and_defaults_to_reach(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.task.kind == "reach" and cfg.model_dump()["task"] == {
        "kind": "reach", "grid": 4, "num_objects": 3, "num_colors": 4, "noise": 0.05}
    babyai = load_config(write(tmp_path, BASE + "task:\n  kind: babyai\n")).model_dump()["task"]
    assert babyai["env_id"] == "BabyAI-GoToObj-v0" and "grid" not in babyai


def test_the_algorithm_section_by_name(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "algorithm:\n  lr: 0.01\n"))
    assert cfg.algorithm.name == "grpo" and cfg.algorithm.lr == 0.01 and cfg.algorithm.group_size == 8
    ppo = load_config(write(tmp_path, BASE + "algorithm:\n  name: ppo\n  gamma: 0.9\n"))
    assert ppo.algorithm.name == "ppo" and ppo.algorithm.gamma == 0.9 and ppo.algorithm.update_epochs == 4
    with pytest.raises(ConfigError, match=r"algorithm.group_size: unknown key for algorithm.name 'ppo'"):
        load_config(write(tmp_path, BASE + "algorithm:\n  name: ppo\n  group_size: 4\n"))
    with pytest.raises(ConfigError, match=r"algorithm.name: got 'dqn': unknown algorithm \(allowed: grpo, ppo\)"):
        load_config(write(tmp_path, BASE + "algorithm:\n  name: dqn\n"))
    with pytest.raises(ConfigError, match=r"runner.stepz: unknown key \(allowed: .*\); did you mean 'steps'"):
        load_config(write(tmp_path, BASE + "runner:\n  stepz: 2\n"))
