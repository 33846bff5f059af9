"""Adapters on disk: PEFT interoperability both ways, atomic saves, validated loads."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.models import make_tiny_llama, randomize_lora

from lora_runtime.actor import prepare_actor
from lora_runtime.adapters import (
    AdapterError,
    LoRALinear,
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


# ------------------------------------------- small hand-built models: exact messages, defaults


def small_model(n: int = 8) -> torch.nn.Module:
    """`fc0` .. `fc{n-1}`, each Linear(6, 5)."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    for i in range(n):
        model.add_module(f"fc{i}", torch.nn.Linear(6, 5))
    return model


def patch(model, r, **kw):
    """apply_lora on every `fc<i>` (the default targets would take only fc1 .. fc3)."""
    return apply_lora(model, r, target_modules=r"fc\d", **kw)


def random_adapters(model, seed=4):
    randomize_lora(model, std=0.5, seed=seed)
    return model


def write_adapter(directory, config, tensors):
    """A hand-written adapter folder (PEFT's file names and key prefix)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in tensors.items()}, directory / ADAPTER_WEIGHTS_NAME)


def adapter_tensors(names, r=2, seed=5, in_features=6, out_features=5):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        out[f"{name}.lora_A.weight"] = torch.randn(r, in_features, generator=gen)
        out[f"{name}.lora_B.weight"] = torch.randn(out_features, r, generator=gen)
    return out


def test_save_writes_sorted_json_pt_metadata_and_replaces_an_existing_adapter(tmp_path):
    from safetensors import safe_open

    model = random_adapters(patch(small_model(2), 2, alpha=3, dropout=0.125, use_rslora=True))
    save_adapter(model, tmp_path / "a")
    text = (tmp_path / "a" / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8")
    cfg = json.loads(text)
    assert text == json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_rslora"]) == (2, 3, 0.125, True)
    with safe_open(str(tmp_path / "a" / ADAPTER_WEIGHTS_NAME), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    expected = {f"base_model.model.{n}.lora_{k}.weight": getattr(layer, f"lora_{k}").weight
                for n, layer in iter_lora_layers(model) for k in "AB"}
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], v) for k, v in expected.items())
    other = random_adapters(patch(small_model(2), 1), seed=9)  # another r, other values
    save_adapter(other, tmp_path / "a")
    assert sorted(os.listdir(tmp_path)) == ["a"]
    back = apply_and_load_adapter(small_model(2), tmp_path / "a")
    for (_, got), (_, want) in zip(iter_lora_layers(back), iter_lora_layers(other)):
        assert got.r == 1 and torch.equal(got.lora_A.weight, want.lora_A.weight)
        assert torch.equal(got.lora_B.weight, want.lora_B.weight)


def test_save_error_messages_name_the_folder(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    model = patch(small_model(1), 1)
    with pytest.raises(AdapterError) as err:
        save_adapter(model, tmp_path / "file")
    assert str(err.value) == f"save_adapter: {tmp_path / 'file'} exists and is not a directory"
    import lora_runtime.adapters.checkpoint as ckpt

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(AdapterError) as err:
        save_adapter(model, tmp_path / "b")
    assert str(err.value) == f"save_adapter: writing {tmp_path / 'b'} failed: [Errno 28] No space left on device"
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_one_message_lists_every_weight_problem_and_nothing_is_loaded(tmp_path):
    model = random_adapters(patch(small_model(5), 2))
    before = snapshot(model)
    tensors = adapter_tensors(["fc0", "fc1", "fc2", "fc3"])
    del tensors["fc0.lora_A.weight"]
    tensors["fc1.lora_B.weight"] = torch.zeros(5, 3)
    tensors["fc2.lora_A.weight"] = torch.ones(2, 6, dtype=torch.int32)
    tensors["fc3.lora_B.weight"][4, 1] = float("nan")
    tensors.update(adapter_tensors(["other"]))
    write_adapter(tmp_path / "a", {"r": 2, "target_modules": ["fc0"]}, tensors)
    with pytest.raises(AdapterError) as err:
        load_adapter(model, tmp_path / "a")
    assert str(err.value) == (
        f"{tmp_path / 'a' / ADAPTER_WEIGHTS_NAME}: cannot load into this model (nothing was changed):\n"
        "  missing adapter weights for 1 module(s): ['fc4']\n"
        "  weights for 1 module(s) the model does not adapt: ['other']\n"
        "  fc0.lora_A.weight is missing\n"
        "  fc1.lora_B.weight has shape [5, 3], expected [5, 2]\n"
        "  fc2.lora_A.weight has dtype torch.int32, expected floating point\n"
        "  fc3.lora_B.weight has non-finite values"
    )
    assert_unchanged(model, before)


def test_missing_and_unexpected_modules_show_six_names_and_the_count(tmp_path):
    model = patch(small_model(8), 2)
    names = [f"x{i}" for i in range(7)]
    write_adapter(tmp_path / "a", {"r": 2, "target_modules": names}, adapter_tensors(names + ["fc7"]))
    with pytest.raises(AdapterError) as err:
        load_adapter(model, tmp_path / "a")
    lines = str(err.value).split("\n")[1:]
    assert lines == [
        "  missing adapter weights for 7 module(s): ['fc0', 'fc1', 'fc2', 'fc3', 'fc4', 'fc5']",
        "  weights for 7 module(s) the model does not adapt: ['x0', 'x1', 'x2', 'x3', 'x4', 'x5']",
    ]


def test_another_rank_is_reported_per_layer_with_the_shapes(tmp_path):
    model = patch(small_model(1), 2)
    write_adapter(tmp_path / "a", {"r": 3, "lora_alpha": 2, "target_modules": ["fc0"]}, adapter_tensors(["fc0"], r=3))
    with pytest.raises(AdapterError) as err:
        load_adapter(model, tmp_path / "a")
    assert str(err.value).split("\n")[1:] == ["  fc0: model layer has r=2, adapter r=3"]
    write_adapter(tmp_path / "b", {"r": 3, "lora_alpha": 2, "target_modules": ["fc0"]}, adapter_tensors(["fc0"], r=2))
    with pytest.raises(AdapterError) as err:
        load_adapter(model, tmp_path / "b")
    assert str(err.value).split("\n")[1:] == [
        "  fc0.lora_A.weight has shape [2, 6], expected [3, 6]",
        "  fc0.lora_B.weight has shape [5, 2], expected [5, 3]",
        "  fc0: model layer has r=2, adapter r=3",
    ]


def test_scaling_mismatch_is_one_line_and_ignores_modules_the_adapter_lacks(tmp_path):
    model = patch(small_model(3), 2, alpha=6, use_rslora=True)
    before = snapshot(model)
    write_adapter(tmp_path / "a", {"r": 2, "target_modules": ["fc0", "fc1", "fc2"]},
                  adapter_tensors(["fc0", "fc1", "fc2"]))  # no lora_alpha, no use_rslora: 2, False
    with pytest.raises(AdapterError) as err:
        load_adapter(model, tmp_path / "a")
    assert str(err.value).split("\n")[1:] == [
        "  fc0: model layer has lora_alpha=6, use_rslora=True; adapter has lora_alpha=2, use_rslora=False"
    ]
    assert_unchanged(model, before)
    # the alpha matches but rsLoRA does not
    write_adapter(tmp_path / "b", {"r": 2, "lora_alpha": 6, "target_modules": ["fc0"]},
                  adapter_tensors(["fc0", "fc1", "fc2"]))
    with pytest.raises(AdapterError, match=r"fc0: model layer has lora_alpha=6, use_rslora=True; "
                                            r"adapter has lora_alpha=6, use_rslora=False$"):
        load_adapter(model, tmp_path / "b")
    # a layer the adapter lacks is reported as missing only, even with another alpha
    mixed = small_model(2)
    mixed.fc0 = LoRALinear(mixed.fc0, 2, lora_alpha=9)
    mixed.fc1 = LoRALinear(mixed.fc1, 2)
    write_adapter(tmp_path / "c", {"r": 2, "target_modules": ["fc1"]}, adapter_tensors(["fc1"]))
    with pytest.raises(AdapterError) as err:
        load_adapter(mixed, tmp_path / "c")
    assert str(err.value).split("\n")[1:] == ["  missing adapter weights for 1 module(s): ['fc0']"]


def test_a_minimal_config_loads_with_peft_defaults(tmp_path):
    tensors = adapter_tensors(["fc0", "fc2"], r=2)
    write_adapter(tmp_path / "a", {"r": 2, "target_modules": ["fc0", "fc2"]}, tensors)
    model = small_model(3)
    assert apply_and_load_adapter(model, tmp_path / "a", expected_rank=2) is model
    layers = dict(iter_lora_layers(model))
    assert list(layers) == ["fc0", "fc2"]
    for name, layer in layers.items():
        assert (layer.r, layer.lora_alpha, layer.scaling, layer.lora_dropout) == (2, 2.0, 1.0, 0.0)
        assert (layer.use_rslora, layer.init) == (False, "kaiming")
        assert torch.equal(layer.lora_A.weight, tensors[f"{name}.lora_A.weight"])
        assert torch.equal(layer.lora_B.weight, tensors[f"{name}.lora_B.weight"])
    # a loaded model computes W x + b + scaling * B A x (float64 reference)
    x = torch.randn(3, 6, dtype=torch.float64)
    layer = layers["fc2"]
    ref = x @ layer.base_layer.weight.double().T + layer.base_layer.bias.double() \
        + 1.0 * (x @ tensors["fc2.lora_A.weight"].double().T) @ tensors["fc2.lora_B.weight"].double().T
    with torch.no_grad():
        assert torch.allclose(layer(x.float()).double(), ref, atol=1e-5)


def test_config_values_reach_the_layers(tmp_path):
    config = {"r": 2, "lora_alpha": 6, "lora_dropout": 0.25, "use_rslora": True,
              "init_lora_weights": "gaussian", "target_modules": r"fc\d", "exclude_modules": ["fc1"]}
    tensors = adapter_tensors(["fc0", "fc2"])
    write_adapter(tmp_path / "a", config, tensors)
    model = apply_and_load_adapter(small_model(3), tmp_path / "a")
    layers = dict(iter_lora_layers(model))
    assert list(layers) == ["fc0", "fc2"]
    for layer in layers.values():
        assert (layer.lora_alpha, layer.lora_dropout, layer.use_rslora, layer.init) == (6.0, 0.25, True, "gaussian")
        assert layer.scaling == pytest.approx(6 / math.sqrt(2), rel=1e-15)
    write_adapter(tmp_path / "b", {**config, "init_lora_weights": False, "exclude_modules": None},
                  adapter_tensors(["fc0", "fc1", "fc2"]))
    model = apply_and_load_adapter(small_model(3), tmp_path / "b")
    assert [(n, layer.init) for n, layer in iter_lora_layers(model)] == [("fc0", "kaiming"), ("fc1", "kaiming"), ("fc2", "kaiming")]


def test_apply_and_load_refusals_name_the_folder_and_leave_the_model_unpatched(tmp_path):
    write_adapter(tmp_path / "a", {"r": 2, "target_modules": ["fc0"]}, adapter_tensors(["fc0"]))
    write_adapter(tmp_path / "none", {"r": 2, "target_modules": ["head"]}, adapter_tensors(["head"]))
    write_adapter(tmp_path / "big", {"r": 6, "target_modules": ["fc0"]}, adapter_tensors(["fc0"], r=6))
    cases = [
        ((tmp_path / "a", 4), (f"actor.model.lora_rank=4 but the adapter in {tmp_path / 'a'} has r=2 "
                              f"({ADAPTER_CONFIG_NAME}); set lora_rank: 2 to resume it")),
        ((tmp_path / "none", None), (f"{tmp_path / 'none' / ADAPTER_CONFIG_NAME}: target_modules=['head'] "
                                    "matches no nn.Linear module of this model")),
        ((tmp_path / "big", None), (f"{tmp_path / 'big'}: apply_lora: module 'fc0': rank r=6 does not fit "
                                   "Linear(6, 5): allowed 1 <= r <= min(in, out) = 5")),
    ]
    for (folder, rank), message in cases:
        model = small_model(2)
        before = snapshot(model)
        with pytest.raises(AdapterError) as err:
            apply_and_load_adapter(model, folder, expected_rank=rank)
        assert str(err.value) == message
        assert not list(iter_lora_layers(model))
        assert_unchanged(model, before)


def test_weights_refused_after_patching_leave_the_base_bit_for_bit(tmp_path):
    """apply_and_load_adapter patches, then checks the weights; a refusal takes the layers out
    without touching the base weights (a merge of the fresh zero-B adapters would turn -0.0
    into +0.0)."""
    tensors = adapter_tensors(["fc0", "fc1"])
    tensors["fc1.lora_B.weight"] = torch.zeros(4, 2)  # wrong shape: found after patching
    write_adapter(tmp_path / "a", {"r": 2, "target_modules": ["fc0", "fc1"]}, tensors)
    model = small_model(2)
    with torch.no_grad():
        model.fc0.weight[0, :3] = -0.0
    before = snapshot(model)
    modules = dict(model.named_children())
    with pytest.raises(AdapterError) as err:
        apply_and_load_adapter(model, tmp_path / "a")
    assert str(err.value).endswith("\n  fc1.lora_B.weight has shape [4, 2], expected [5, 2]")
    assert dict(model.named_children()) == modules and not list(iter_lora_layers(model))
    for key, value in model.state_dict().items():
        assert torch.equal(value.view(torch.int32), before[key].view(torch.int32)), key  # bits


def test_load_adapter_takes_a_folder_already_read(tmp_path):
    from lora_runtime.adapters.peft_format import read_adapter as read_folder

    tensors = adapter_tensors(["fc0", "fc1"])
    write_adapter(tmp_path / "a", {"r": 2, "target_modules": ["fc0", "fc1"]}, tensors)
    files = read_folder(tmp_path / "a")
    (tmp_path / "a" / ADAPTER_WEIGHTS_NAME).unlink()  # the files are not read again
    model = patch(small_model(2), 2)
    load_adapter(model, files)
    for name, layer in iter_lora_layers(model):
        assert torch.equal(layer.lora_A.weight, tensors[f"{name}.lora_A.weight"])
        assert torch.equal(layer.lora_B.weight, tensors[f"{name}.lora_B.weight"])
