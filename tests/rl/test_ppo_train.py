"""PPO with a value head on a BabyAI level (toy sizes): the head trains with the adapters,
is saved with them (PEFT's `modules_to_save`), loads into PEFT, and a resumed run continues
exactly; full mode keeps the head beside the model folder."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from support.tiny_episodic import tiny_episodic_raw
from support.tiny_runs import quiet

from lora_runtime.adapters.peft_format import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from lora_runtime.cli import main
from lora_runtime.config import validate_config
from lora_runtime.rl.builtin_base import builtin_base_dir
from lora_runtime.rl.models import load_model_folder
from lora_runtime.rl.outputs import read_metrics
from lora_runtime.rl.trainer import train
from lora_runtime.rl.value_head import FULL_MODE_FILE

PPO = {"name": "ppo", "rollout_steps": 6, "minibatches": 2, "update_epochs": 2, "lr": 1e-2}
HEAD = ("base_model.model.value_head.weight", "base_model.model.value_head.bias")

pytestmark = pytest.mark.usefixtures("one_thread")


def run(raw):
    return train(validate_config(raw), log=quiet)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    torch.set_num_threads(1)
    base = root / "base"
    new = run(tiny_episodic_raw(root / "new", base, algorithm=PPO))
    resume = run(tiny_episodic_raw(root / "resume", base, lora_path=root / "new" / "adapter", algorithm=PPO))
    full = run(tiny_episodic_raw(root / "full", base, mode="full", algorithm={**PPO, "lr": 3e-3}))
    return root, new, resume, full


def test_ppo_metrics_and_the_head_saved_with_the_adapter(runs):
    _, new, _, _ = runs
    records = read_metrics(os.path.join(new.output_dir, "metrics.jsonl"))
    assert len(records) == 2
    for r in records:
        assert r["env_steps"] == 6 * 4  # rollout_steps x num_envs: the same shape every iteration
        assert r["trained_rows"] == 24 and r["value_loss"] >= 0 and r["grad_norm"] > 0
    with open(os.path.join(new.output_dir, "adapter", ADAPTER_CONFIG_NAME), encoding="utf-8") as f:
        assert json.load(f)["modules_to_save"] == ["value_head"]
    saved = load_file(os.path.join(new.output_dir, "adapter", ADAPTER_WEIGHTS_NAME))
    head = new.model.value_head
    assert saved[HEAD[0]].shape == (1, head.in_features) and saved[HEAD[1]].shape == (1,)
    torch.testing.assert_close(saved[HEAD[0]], head.weight.detach(), rtol=0, atol=0)
    assert head.weight.abs().max() > 0.02  # trained away from its N(0, 0.01) init


def test_peft_loads_the_adapter_with_its_value_head(runs):
    from peft import PeftModel

    root, new, _, _ = runs
    cfg = validate_config(tiny_episodic_raw(root / "x", root / "base"))
    base = load_model_folder(builtin_base_dir(cfg))
    base.value_head = torch.nn.Linear(new.model.value_head.in_features, 1)
    peft = PeftModel.from_pretrained(base, os.path.join(new.output_dir, "adapter"))
    loaded = peft.base_model.model.value_head.modules_to_save["default"]
    torch.testing.assert_close(loaded.weight, new.model.value_head.weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(loaded.bias, new.model.value_head.bias.detach(), rtol=0, atol=0)


def test_resume_restores_the_head_and_continues_exactly(runs, tmp_path):
    root, _, resume, _ = runs
    longer = run(tiny_episodic_raw(tmp_path / "long", root / "base", steps=4, algorithm=PPO))
    a = load_file(os.path.join(resume.output_dir, "adapter", ADAPTER_WEIGHTS_NAME))
    b = load_file(os.path.join(longer.output_dir, "adapter", ADAPTER_WEIGHTS_NAME))
    assert a.keys() == b.keys() and set(HEAD) <= set(a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in read_metrics(os.path.join(resume.output_dir, "metrics.jsonl"))] == [3, 4]


def test_full_mode_keeps_the_head_beside_a_loadable_model_folder(runs):
    _, _, _, full = runs
    folder = os.path.join(full.output_dir, "model")
    head = load_file(os.path.join(folder, FULL_MODE_FILE))
    assert set(head) == {"weight", "bias"}
    model = load_model_folder(folder)  # the model's own weights only: no value_head keys
    assert not hasattr(model, "value_head")


def test_ppo_on_a_one_step_task_is_refused_before_any_work(tmp_path, capsys):
    import yaml
    from support.tiny_runs import tiny_raw

    raw = tiny_raw(tmp_path / "out", tmp_path / "base")
    raw["algorithm"] = dict(PPO)
    path = tmp_path / "reach.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "algorithm.name: ppo needs a multi-step task" in err and "task.kind: reach" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "base").exists()
