"""Config validation: modes, defaults, and errors that name the file, key and value."""

from __future__ import annotations

import pytest

from lora_runtime.config import DEFAULT_TARGETS, ActorModelConfig, ConfigError, load_config


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
    assert tuple(m.target_modules) == DEFAULT_TARGETS
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
        load_config(write(tmp_path, "trainer: {}\n"))


def test_overrides(tmp_path):
    path = write(tmp_path, "actor:\n  model:\n    is_lora: True\n    lora_rank: 32\n")
    cfg = load_config(path, ["actor.model.lora_rank=8", "actor.model.lora_path=/a"])
    assert cfg.actor.model.lora_rank == 8 and cfg.actor.model.mode == "resume"
    with pytest.raises(ConfigError, match=r"(?s)with --set actor.model.lora_rnak=8.*actor.model.lora_rnak: unknown key"):
        load_config(path, ["actor.model.lora_rnak=8"])
    with pytest.raises(ConfigError, match=r"--set 'actor.model': expected dotted.key=value"):
        load_config(path, ["actor.model"])
    assert load_config(path).actor.model.lora_rank == 32  # the file itself is untouched
