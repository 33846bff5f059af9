"""The text task on a tiny transformers model folder made here: the token-level GRPO loss
against a float64 reference, generation with and without the KV cache, the three modes
through the CLI, the PEFT round trip of the adapter, `eval`, and the bad inputs."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from support.text_folders import text_task_folder, word_llama_folder

from lora_runtime.cli import main
from lora_runtime.config import validate_config
from lora_runtime.rl.algorithms.grpo import grpo_loss
from lora_runtime.rl.outputs import read_metrics

pytest.importorskip("transformers")

# --- the loss -----------------------------------------------------------------------------


def _reference_loss(logp, old, adv, kl, mask, clip, beta, loss_type):
    """The GRPO loss written per token in float64 Python loops."""
    n, a = logp.shape
    rows, total_tokens = [], 0.0
    for i in range(n):
        terms = []
        for t in range(a):
            if mask[i, t]:
                ratio = torch.exp(logp[i, t] - old[i, t])
                s = torch.minimum(ratio * adv[i], ratio.clamp(1 - clip, 1 + clip) * adv[i])
                terms.append(-s + beta * kl[i, t])
        rows.append(terms)
        total_tokens += len(terms)
    if loss_type == "sequence_mean":
        return sum(sum(r) / len(r) for r in rows) / n
    if loss_type == "token_mean":
        return sum(sum(r) for r in rows) / total_tokens
    return sum(sum(r) / a for r in rows) / n  # dr_grpo


@pytest.mark.parametrize("loss_type", ["sequence_mean", "token_mean", "dr_grpo"])
def test_the_token_level_loss_matches_a_float64_reference(loss_type):
    g = torch.Generator().manual_seed(0)
    n, a = 5, 6
    logp = (torch.randn(n, a, generator=g) * 0.5 - 1.0).requires_grad_(True)
    old = logp.detach() + torch.randn(n, a, generator=g) * 0.3
    adv = torch.randn(n, generator=g)
    kl = torch.rand(n, a, generator=g).requires_grad_(True)
    lengths = torch.tensor([6, 1, 3, 4, 2])
    mask = (torch.arange(a)[None] < lengths[:, None]).float()
    loss, _ = grpo_loss(logp, old, adv, kl, 0.2, 0.1, mask=mask, loss_type=loss_type)
    loss.backward()
    logp64 = logp.detach().double().requires_grad_(True)
    kl64 = kl.detach().double().requires_grad_(True)
    ref = _reference_loss(logp64, old.double(), adv.double(), kl64, mask.bool(), 0.2, 0.1, loss_type)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logp.grad.double(), logp64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(kl.grad.double(), kl64.grad, rtol=1e-5, atol=1e-7)
    assert (logp.grad[~mask.bool()] == 0).all()  # tokens after the end get no gradient


def test_without_a_mask_the_loss_is_the_old_mean():
    g = torch.Generator().manual_seed(1)
    logp, old, adv, kl = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g), torch.randn(4, generator=g), \
        torch.rand(4, 2, generator=g)
    plain, _ = grpo_loss(logp, old, adv, kl, 0.2, 0.1)
    ratio = torch.exp(logp - old)
    s = torch.minimum(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None])
    assert torch.equal(plain, -s.mean() + 0.1 * kl.mean())
    for loss_type in ("sequence_mean", "token_mean", "dr_grpo"):  # every token counts: all three agree
        masked, _ = grpo_loss(logp, old, adv, kl, 0.2, 0.1, mask=torch.ones(4, 2), loss_type=loss_type)
        torch.testing.assert_close(masked, plain)


# --- runs on a model folder -------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    rows = [{"prompt": f"w{i} w{i + 1} w{i + 2}", "answer": f"w{i + 3}"} for i in range(24)]
    return root, text_task_folder(root, rows)


def _raw(root, model, out, mode="new", lora_path=None, **over):
    raw = {"actor": {"model": {"is_lora": mode != "full", "lora_rank": 4, "model_path": model,
                               "lora_path": lora_path}},
           "task": {"kind": "text", "dataset": str(root / "data.jsonl"), "eval_fraction": 0.25,
                    "reward": [{"function": f"{root / 'my_rewards.py'}:words", "weight": 2.0}], "max_new_tokens": 4},
           "algorithm": {"batch_size": 4, "group_size": 4, "lr": 1e-2, "kl_coef": 0.05, "loss_type": "token_mean"},
           "runner": {"output_dir": str(out), "steps": 2, "num_threads": 1, "progress": False, "plot": False}}
    for dotted, value in over.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return raw


def _write(path, raw) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_three_modes_train_through_the_cli_and_the_adapter_loads_in_peft(folder, tmp_path):
    root, model = folder
    new = _write(tmp_path / "new.yaml", _raw(root, model, tmp_path / "new"))
    assert main(["train", new]) == 0
    records = read_metrics(str(tmp_path / "new" / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2]
    assert all(0.0 <= r["reward_mean"] <= 2.0 and 1 <= r["completion_len"] <= 4 for r in records)
    assert all(r["rollout_logp_gap"] < 1e-4 for r in records), [r["rollout_logp_gap"] for r in records]
    adapter = tmp_path / "new" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()

    resume = _write(tmp_path / "resume.yaml", _raw(root, model, tmp_path / "resume", "resume", str(adapter)))
    assert main(["train", resume]) == 0
    assert (tmp_path / "resume" / "adapter" / "adapter_model.safetensors").is_file()
    full = _write(tmp_path / "full.yaml", _raw(root, model, tmp_path / "full", "full", algorithm__lr=1e-3))
    assert main(["train", full]) == 0
    assert (tmp_path / "full" / "model" / "config.json").is_file()

    # the PEFT round trip: PEFT reads the adapter onto the same base and computes the same logits
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lora_runtime.adapters import apply_and_load_adapter

    ids = torch.tensor([[5, 6, 7, 8]])
    ours = AutoModelForCausalLM.from_pretrained(model, local_files_only=True).eval()
    apply_and_load_adapter(ours, str(adapter))
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, local_files_only=True),
                                            str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_eval_answers_the_held_out_prompts_greedily(folder, tmp_path, capsys):
    root, model = folder
    path = _write(tmp_path / "eval.yaml", _raw(root, model, tmp_path / "run"))
    out = tmp_path / "eval.json"
    assert main(["eval", path, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["episodes"] == 6 and 0.0 <= result["accuracy"] <= 1.0  # the last quarter of 24 prompts
    assert "eval: text" in capsys.readouterr().out


def test_bf16_base_keeps_bf16_with_float32_adapters(folder, tmp_path):
    root, _ = folder
    model = word_llama_folder(str(tmp_path / "bf16"), dtype=torch.bfloat16)
    from lora_runtime.adapters import iter_lora_layers
    from lora_runtime.rl.actor_builder import build_actor
    from lora_runtime.rl.tasks import build_task

    cfg = validate_config(_raw(root, model, tmp_path / "run"))
    actor = build_actor(cfg, log=lambda m: None)
    layer = next(layer for _, layer in iter_lora_layers(actor))
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    assert build_task(cfg, actor).evaluate(actor, 2)["episodes"] == 2


@pytest.mark.parametrize(("over", "message"), [
    ({"algorithm__name": "ppo"}, "algorithm.name: ppo is not supported with task.kind: text"),
    ({"task__reward": "no_such_module:f"}, "no module named 'no_such_module'"),
    ({"task__max_new_tokens": 62}, (r"data.jsonl: row 1: the prompt is 3 tokens; with task.max_new_tokens=62 it "
                                    "exceeds the model's context of 64 tokens")),
])
def test_bad_input_is_refused_before_training(folder, tmp_path, capsys, over, message):
    root, model = folder
    raw = _raw(root, model, tmp_path / "run")
    if over.get("algorithm__name") == "ppo":
        raw["algorithm"] = {"name": "ppo"}
        over = {}
    path = _write(tmp_path / "bad.yaml", raw | {} if not over else _raw(root, model, tmp_path / "run", **over))
    assert main(["train", path]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_raising_reward_is_named_before_training(folder, tmp_path, capsys):
    root, model = folder
    raw = _raw(root, model, tmp_path / "run", task__reward=f"{root / 'my_rewards.py'}:boom")
    assert main(["train", _write(tmp_path / "boom.yaml", raw)]) == 2
    err = capsys.readouterr().err
    assert "reward function" in err and "my_rewards.py:boom raised ValueError: the grader is down" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_a_reward_failing_mid_run_leaves_the_last_complete_save(folder, tmp_path, capsys):
    from lora_runtime.adapters import read_adapter

    root, model = folder
    raw = _raw(root, model, tmp_path / "run", task__reward=f"{root / 'my_rewards.py'}:later", runner__steps=3,
               runner__save_every=1)
    assert main(["train", _write(tmp_path / "later.yaml", raw)]) == 2
    err = capsys.readouterr().err
    assert "my_rewards.py:later raised RuntimeError: the grader went away" in err and "Traceback" not in err
    assert read_adapter(str(tmp_path / "run" / "adapter"))  # step 1's save is complete and loadable
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_model_folder_without_a_tokenizer_is_named(folder, tmp_path, capsys):
    root, _ = folder
    model = word_llama_folder(str(tmp_path / "notok"))
    for name in os.listdir(model):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            os.remove(os.path.join(model, name))
    assert main(["train", _write(tmp_path / "notok.yaml", _raw(root, model, tmp_path / "run"))]) == 2
    err = capsys.readouterr().err
    assert "actor.model.model_path" in err and "has no usable tokenizer" in err and "Traceback" not in err


def test_the_builtin_tiny_lm_is_warm_started_once_with_its_tokenizer(tmp_path):
    from lora_runtime.rl.builtin_base import base_report, builtin_base_dir

    raw = {"actor": {"model": {"is_lora": True, "lora_rank": 4},
                     "builtin": {"text_dim": 32, "text_layers": 1, "text_heads": 2, "text_mlp_dim": 64,
                                 "max_text_len": 16, "pretrain_steps": 5, "pretrain_batch_size": 8}},
           "task": {"kind": "text", "num_prompts": 40, "max_operand": 10, "eval_fraction": 0.25, "max_new_tokens": 3},
           "algorithm": {"batch_size": 2, "group_size": 4},
           "runner": {"output_dir": str(tmp_path / "runs" / "new"), "steps": 1, "num_threads": 1, "progress": False,
                      "plot": False}}
    path = _write(tmp_path / "builtin.yaml", raw)
    assert main(["train", path]) == 0
    cfg = validate_config(raw)
    base = builtin_base_dir(cfg)
    assert os.path.basename(base).startswith("tiny-lm-") and os.path.dirname(base) == str(tmp_path / "runs" / "base")
    assert os.path.isfile(os.path.join(base, "tokenizer.json"))
    report = base_report(cfg)
    assert report["steps"] == 5 and report["eval_prompts"] == 10 and 0.0 <= report["warm_start_accuracy"] <= 1.0
    records = read_metrics(str(tmp_path / "runs" / "new" / "metrics.jsonl"))
    assert records[0]["warm_start_accuracy"] == report["warm_start_accuracy"]
