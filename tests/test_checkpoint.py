"""Adapters on disk: PEFT interoperability both ways, atomic saves, validated loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import make_tiny_llama, randomize_lora
from safetensors.torch import load_file, save_file

from lora_runtime.actor import prepare_actor
from lora_runtime.adapters import (
    AdapterError,
    apply_and_load_adapter,
    apply_lora,
    iter_lora_layers,
    load_adapter,
    mark_only_lora_trainable,
    save_adapter,
)
from lora_runtime.adapters.peft_format import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from lora_runtime.config import ActorModelConfig


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def lora_model(r=4, alpha=8, seed=1, **kw):
    model = make_tiny_llama()
    apply_lora(model, r, alpha=alpha, **kw)
    randomize_lora(model, seed=seed)
    return model


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_saved_adapter_loads_in_peft_with_same_logits_and_gradients(tmp_path, token_ids):
    from peft import PeftModel

    ours = lora_model(r=4, alpha=12)
    mark_only_lora_trainable(ours)
    save_adapter(ours, tmp_path / "adapter")
    files = sorted(os.listdir(tmp_path / "adapter"))
    assert files == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    keys = set(load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS_NAME))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 15

    peft = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "adapter", is_trainable=True)
    ours.train(), peft.train()
    y_ours, y_peft = ours(token_ids).logits, peft(token_ids).logits
    assert not torch.allclose(y_ours, make_tiny_llama()(token_ids).logits, atol=1e-4)  # LoRA matters
    assert rel(y_ours, y_peft) < 1e-5
    y_ours.square().mean().backward()
    y_peft.square().mean().backward()
    peft_grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad for n, p in peft.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(ours_grads) == set(peft_grads)
    for name, g in ours_grads.items():
        assert rel(g, peft_grads[name]) < 1e-5, name


@pytest.mark.parametrize("key_style", ["peft", "no_prefix", "adapter_name"])
def test_peft_saved_adapter_loads_here(tmp_path, token_ids, key_style):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(
        make_tiny_llama(),
        LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights="gaussian"),
    )
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    peft.save_pretrained(tmp_path / "peft")
    weights = tmp_path / "peft" / ADAPTER_WEIGHTS_NAME
    if key_style != "peft":
        tensors = load_file(weights)
        if key_style == "no_prefix":
            tensors = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
        else:
            tensors = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
        save_file(tensors, weights)
    ours = apply_and_load_adapter(make_tiny_llama(), tmp_path / "peft")
    layers = dict(iter_lora_layers(ours))
    assert len(layers) == 6 and all(layer.scaling == 3.0 for layer in layers.values())
    with torch.no_grad():
        assert rel(ours(token_ids).logits, peft(token_ids).logits) < 1e-5


def test_resume_mode_takes_r_alpha_targets_from_adapter(tmp_path, token_ids):
    src = lora_model(r=4, alpha=8, target_modules=["q_proj", "up_proj"])
    save_adapter(src, tmp_path / "a")
    cfg = ActorModelConfig(is_lora=True, lora_rank=4, lora_path=str(tmp_path / "a"), lora_alpha=99)
    model = prepare_actor(make_tiny_llama(), cfg)
    assert {n.rsplit(".", 1)[-1] for n, _ in iter_lora_layers(model)} == {"q_proj", "up_proj"}
    assert all(layer.scaling == 2.0 for _, layer in iter_lora_layers(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in src.named_parameters() if "lora_" in n}
    with torch.no_grad():
        assert torch.equal(model(token_ids).logits, src(token_ids).logits)


def test_resume_rank_mismatch_names_both_values(tmp_path):
    save_adapter(lora_model(r=4), tmp_path / "a")
    model = make_tiny_llama()
    before = snapshot(model)
    cfg = ActorModelConfig(is_lora=True, lora_rank=32, lora_path=str(tmp_path / "a"))
    with pytest.raises(AdapterError, match=r"actor.model.lora_rank=32 but the adapter in .*a has r=4"):
        prepare_actor(model, cfg)
    assert not list(iter_lora_layers(model))
    assert_unchanged(model, before)


def test_target_modules_regex_when_leaf_names_over_match(tmp_path, token_ids):
    src = lora_model(target_modules=["layers.0.self_attn.q_proj"])
    save_adapter(src, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / ADAPTER_CONFIG_NAME).read_text())
    assert cfg["target_modules"] == r"^(model\.layers\.0\.self_attn\.q_proj)$"
    from peft import PeftModel

    peft = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "a")
    with torch.no_grad():
        assert rel(peft(token_ids).logits, src(token_ids).logits) < 1e-5
    loaded = apply_and_load_adapter(make_tiny_llama(), tmp_path / "a")
    assert [n for n, _ in iter_lora_layers(loaded)] == ["model.layers.0.self_attn.q_proj"]


# ---------------------------------------------------------------------- bad adapters


def corrupt(directory, how):
    weights, config = directory / ADAPTER_WEIGHTS_NAME, directory / ADAPTER_CONFIG_NAME
    tensors = load_file(weights)
    key_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    if how == "missing_key":
        del tensors[key_a]
    elif how == "missing_module":
        del tensors[key_a], tensors[key_a.replace("lora_A", "lora_B")]
    elif how == "int_dtype":
        tensors[key_a] = torch.ones(4, 64, dtype=torch.int64)
    elif how == "unexpected_key":
        tensors["base_model.model.model.layers.0.self_attn.nope.lora_A.weight"] = torch.zeros(4, 64)
    elif how == "wrong_shape":
        tensors[key_a] = torch.zeros(4, 63)
    elif how == "non_finite":
        tensors[key_a][0, 0] = float("inf")
    elif how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        return
    elif how == "not_safetensors":
        weights.write_text("hello")
        return
    elif how == "no_config":
        config.unlink()
        return
    elif how == "bad_json":
        config.write_text("{ r: 4")
        return
    elif how == "bad_r":
        cfg = json.loads(config.read_text())
        cfg["r"] = "four"
        config.write_text(json.dumps(cfg))
        return
    elif how == "no_weights":
        weights.unlink()
        return
    save_file(tensors, weights)


@pytest.mark.parametrize(
    "how,match",
    [
        ("missing_key", r"model.layers.0.self_attn.q_proj.lora_A.weight is missing"),
        ("missing_module", r"missing adapter weights for 1 module\(s\): \['model.layers.0.self_attn.q_proj'\]"),
        ("int_dtype", r"q_proj.lora_A.weight has dtype torch.int64, expected floating point"),
        ("unexpected_key", r"weights for 1 module\(s\) the model does not adapt: \['model.layers.0.self_attn.nope'\]"),
        ("wrong_shape", r"q_proj.lora_A.weight has shape \[4, 63\], expected \[4, 64\]"),
        ("non_finite", r"q_proj.lora_A.weight has non-finite values"),
        ("truncated", r"adapter_model.safetensors: not a readable safetensors file"),
        ("not_safetensors", r"adapter_model.safetensors: not a readable safetensors file"),
        ("no_config", r"adapter_config.json: missing"),
        ("bad_json", r"adapter_config.json: not valid JSON"),
        ("bad_r", r"r='four' \(an integer >= 1 is required\)"),
        ("no_weights", r"adapter_model.safetensors: missing"),
    ],
)
def test_bad_adapter_is_refused_and_model_unchanged(tmp_path, how, match):
    save_adapter(lora_model(seed=1), tmp_path / "a")
    corrupt(tmp_path / "a", how)
    target = lora_model(seed=2)  # already patched, different weights
    before = snapshot(target)
    with pytest.raises(AdapterError, match=match):
        load_adapter(target, tmp_path / "a")
    assert_unchanged(target, before)
    base = make_tiny_llama()
    before = snapshot(base)
    with pytest.raises(AdapterError):
        apply_and_load_adapter(base, tmp_path / "a")
    assert not list(iter_lora_layers(base))
    assert_unchanged(base, before)


def test_missing_folder_and_unsupported_config(tmp_path):
    with pytest.raises(AdapterError, match=r"adapter folder .*nowhere does not exist"):
        apply_and_load_adapter(make_tiny_llama(), tmp_path / "nowhere")
    save_adapter(lora_model(), tmp_path / "a")
    config = tmp_path / "a" / ADAPTER_CONFIG_NAME
    cfg = json.loads(config.read_text())
    config.write_text(json.dumps({**cfg, "use_dora": True, "fan_in_fan_out": True}))
    with pytest.raises(AdapterError, match=r"(?s)fan_in_fan_out=True \(not supported.*use_dora=True"):
        apply_and_load_adapter(make_tiny_llama(), tmp_path / "a")


def test_alpha_mismatch_with_patched_model(tmp_path):
    save_adapter(lora_model(r=4, alpha=8), tmp_path / "a")
    target = lora_model(r=4, alpha=4)
    before = snapshot(target)
    with pytest.raises(AdapterError, match=r"model layer has lora_alpha=4.*adapter has lora_alpha=8"):
        load_adapter(target, tmp_path / "a")
    assert_unchanged(target, before)


def test_save_errors(tmp_path):
    with pytest.raises(AdapterError, match=r"the model has no LoRA layers"):
        save_adapter(make_tiny_llama(), tmp_path / "a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterError, match=r"file exists and is not a directory"):
        save_adapter(lora_model(), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


# ---------------------------------------------------------------------- atomic saves


def read_adapter(directory):
    return load_file(directory / ADAPTER_WEIGHTS_NAME), json.loads((directory / ADAPTER_CONFIG_NAME).read_text())


def test_failed_save_keeps_previous_adapter(tmp_path, monkeypatch):
    save_adapter(lora_model(r=4, seed=1), tmp_path / "a")
    old_weights, old_cfg = read_adapter(tmp_path / "a")
    import lora_runtime.adapters.checkpoint as ckpt

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(AdapterError, match="No space left on device"):
        save_adapter(lora_model(r=8, seed=2), tmp_path / "a")
    weights, cfg = read_adapter(tmp_path / "a")
    assert cfg == old_cfg and weights.keys() == old_weights.keys()
    assert all(torch.equal(weights[k], old_weights[k]) for k in weights)
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no staging folder left behind


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    from torch import nn
    from lora_runtime.adapters.inject import apply_lora, iter_lora_layers
    from lora_runtime.adapters.checkpoint import save_adapter
    torch.set_num_threads(1)  # forks below: no thread pool in this process
    torch.manual_seed(0)
    model = nn.Module()
    for i in range(8):
        model.add_module(f"fc{i}", nn.Linear(512, 512))
    apply_lora(model, 64, target_modules=[f"fc{i}" for i in range(8)])
    for command in sys.stdin:  # one imported process, a fresh saver child per "fork"
        if command.startswith("wait"):
            _, status = os.waitpid(int(command.split()[1]), 0)
            print("killed by", os.WTERMSIG(status) if os.WIFSIGNALED(status) else None, flush=True)
            continue
        pid = os.fork()
        if pid == 0:
            value = 1.0
            while True:
                value += 1.0
                for _, layer in iter_lora_layers(model):
                    layer.lora_A.weight.data.fill_(value)
                    layer.lora_B.weight.data.fill_(value)
                save_adapter(model, sys.argv[1])
        print("ready", pid, flush=True)
    """
)


@pytest.mark.slow
def test_killed_save_leaves_previous_or_new_complete_adapter(tmp_path):
    """kill -9 of a process saving in a loop, at 5 moments: the folder holds one save's
    complete tensors or nothing. The savers are forks of one process (one interpreter start)."""
    script = tmp_path / "saver.py"
    script.write_text(KILL_SCRIPT)
    target = tmp_path / "adapter"
    server = subprocess.Popen([sys.executable, str(script), str(target)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        for delay in (0.35, 0.5, 0.65, 0.8, 0.95):
            server.stdin.write("fork\n")
            server.stdin.flush()
            word, pid = server.stdout.readline().split()
            assert word == "ready"
            time.sleep(delay)
            os.kill(int(pid), signal.SIGKILL)
            server.stdin.write(f"wait {pid}\n")
            server.stdin.flush()
            assert server.stdout.readline().split() == ["killed", "by", str(int(signal.SIGKILL))]
            if not target.exists():
                continue  # killed before the first save finished: nothing half-written either
            weights, cfg = read_adapter(target)  # complete and readable
            assert cfg["r"] == 64 and len(weights) == 16
            values = {t.flatten()[0].item() for t in weights.values()}
            assert len(values) == 1  # one save's tensors, never a mix of two saves
            assert all(torch.all(t == t.flatten()[0]) for t in weights.values())
    finally:
        server.stdin.close()
        assert server.wait(timeout=60) == 0
    assert target.exists(), "no save completed in any run; the test did not exercise anything"
