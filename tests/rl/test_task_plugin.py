"""A new task is one module: registered from this test file, validated by the config and
trained two steps through the CLI's code path, with no edit to the trainer or the CLI."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
import yaml
from pydantic import Field, StrictInt

from lora_runtime.cli import main
from lora_runtime.config import ConfigError, RunConfig, TaskSection, validate_config
from lora_runtime.rl.models import BOS, ModelInputs
from lora_runtime.rl.outputs import read_metrics
from lora_runtime.rl.policy import gumbel_sample
from lora_runtime.rl.tasks import Experience, Task, register_task

PALETTE = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.2, 0.9], [0.1, 0.8, 0.2], [0.9, 0.9, 0.1]])  # [4, 3]


class ColourSection(TaskSection):
    """`kind: colour`: name the image's colour with one action token."""

    kind: Literal["colour"] = "colour"
    colours: StrictInt = Field(2, ge=2, le=4)


class ColourTask(Task):
    """The image is one flat colour out of `colours`; action `k` is right for colour `k`."""

    section = ColourSection

    @classmethod
    def build(cls, run_cfg: RunConfig, model, family) -> ColourTask:
        task = cls()
        task.family, task.k = family, run_cfg.task.colours
        vocab = family.vocab_size(model)
        task.size = family.image_size(model)
        task.action_ids = torch.arange(vocab - task.k, vocab)  # [K]
        task.chance_reward, task.levels = 1.0 / task.k, {}
        return task

    def describe(self) -> str:
        return f"colour: {self.k} colours"

    def inputs(self, labels: torch.Tensor, repeats: int) -> ModelInputs:
        pixels = PALETTE[labels][:, :, None, None].expand(-1, -1, self.size, self.size).contiguous()  # [B, 3, H, W]
        n = len(labels) * repeats
        return ModelInputs(pixels, None, torch.full((n, 1), BOS), torch.ones(n, dtype=torch.long), repeats)

    def example_inputs(self) -> ModelInputs:
        return self.inputs(torch.arange(2) % self.k, 1)

    def warm_start(self, model, run_cfg, log) -> dict:
        return {"steps": 0, "note": "the seeded init"}

    @torch.no_grad()
    def collect(self, policy, num_groups, group_size, generator) -> Experience:
        device = policy.action_ids.device
        labels = torch.randint(0, self.k, (num_groups,), generator=generator)  # [B]
        inputs = self.inputs(labels, group_size).to(device)
        positions = torch.zeros(len(inputs), 1, dtype=torch.long, device=device)  # [N, 1]
        logp = policy(inputs, positions)[0][:, 0]  # [N, K]
        choice = gumbel_sample(logp, generator)  # [N]
        rewards = (choice.cpu() == labels.repeat_interleave(group_size)).float()  # [N]
        return Experience(inputs, positions, choice[:, None], logp.gather(-1, choice[:, None]),
                          {"reward_mean": rewards.mean().item()}, len(choice),
                          episode=torch.arange(len(choice)), returns=rewards, group_size=group_size)


register_task(ColourTask)

BUILTIN = {"image_size": 8, "patch_size": 4, "vision_dim": 16, "vision_layers": 1, "vision_heads": 2,
           "vision_mlp_dim": 32, "text_dim": 16, "text_layers": 1, "text_heads": 2, "text_mlp_dim": 32,
           "vocab_size": 16, "max_text_len": 4}


def _raw(tmp_path, **task) -> dict:
    return {"actor": {"model": {"is_lora": True, "lora_rank": 4}, "builtin": dict(BUILTIN)},
            "task": {"kind": "colour", **task},
            "algorithm": {"batch_size": 4, "group_size": 4, "lr": 1e-2},
            "runner": {"output_dir": str(tmp_path / "run"), "steps": 2, "num_threads": 1, "progress": False,
                       "plot": False}}


def test_the_config_validates_the_plugin_section(tmp_path):
    cfg = validate_config(_raw(tmp_path, colours=3))
    assert isinstance(cfg.task, ColourSection) and cfg.task.colours == 3
    assert cfg.model_dump()["task"] == {"kind": "colour", "colours": 3}
    with pytest.raises(ConfigError, match=r"task.grid: unknown key for task.kind 'colour' \(allowed: colours, kind\)"):
        validate_config(_raw(tmp_path, grid=4))
    with pytest.raises(ConfigError, match=r"task.colours: got 9"):
        validate_config(_raw(tmp_path, colours=9))


def test_registering_another_class_under_a_taken_kind_is_refused():
    class Other(ColourTask):
        section = ColourSection

    with pytest.raises(ValueError, match="task kind 'colour' is already registered by ColourTask"):
        register_task(Other)


def test_a_plugin_task_trains_two_steps_through_the_cli(tmp_path, capsys):
    path = tmp_path / "colour.yaml"
    path.write_text(yaml.safe_dump(_raw(tmp_path)))
    assert main(["train", str(path)]) == 0
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2]
    assert all(0.0 <= r["reward_mean"] <= 1.0 and r["chance_reward"] == 0.5 for r in records)
    assert any(r["trained_rows"] > 0 for r in records)  # a group with differing rewards was trained on
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert "colour: 2 colours" in capsys.readouterr().err
