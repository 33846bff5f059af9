"""Every `actor.model` and `trainer` key through YAML -> `load_config` -> `build_actor` /
`train` -> the model, each shown to change what it says: scaling values against a float64
reference, dropout on in train and off in eval, excluded modules left alone, the init's
statistics, rsLoRA kept through save, PEFT and reload, and the trainer's update keys."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from support.models import make_tiny_llama, randomize_lora
from support.tiny_runs import quiet, tiny_raw, untrained_raw, write_yaml
from torch import nn

from lora_runtime.adapters import LoRALinear, adapter_disabled, iter_lora_layers, save_adapter
from lora_runtime.adapters.peft_format import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from lora_runtime.config import load_config
from lora_runtime.rl import learners
from lora_runtime.rl import policy as rl_policy
from lora_runtime.rl.actor_builder import build_actor
from lora_runtime.rl.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


def actor_from_yaml(tmp_path, base=None, **model_keys):
    """YAML file -> `load_config` -> `build_actor` (built-in sizes, seeded initial weights)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    raw = tiny_raw(tmp_path / "out", tmp_path / "base")
    raw["actor"]["model"].update(model_keys)
    if base is not None:
        raw["actor"]["model"]["model_path"] = str(base)
    cfg = load_config(write_yaml(tmp_path / "run.yaml", raw))
    return build_actor(cfg, create_base=False, log=quiet)


def reference_output(layer: LoRALinear, x: torch.Tensor, scaling: float) -> torch.Tensor:
    """`x W^T + b + scaling * (x A^T) B^T` in float64 from the layer's tensors."""
    w = layer.base_layer.weight.double()
    b = layer.base_layer.bias
    a, bb = layer.lora_A.weight.double(), layer.lora_B.weight.double()
    out = x.double() @ w.T + (0.0 if b is None else b.double())
    return out + scaling * (x.double() @ a.T) @ bb.T


@pytest.mark.parametrize("keys, scaling", [
    ({"lora_rank": 4}, 1.0),
    ({"lora_rank": 4, "lora_alpha": 12}, 3.0),
    ({"lora_rank": 4, "lora_alpha": 12, "use_rslora": True}, 6.0),
])
def test_rank_alpha_and_rslora_set_the_scaling(tmp_path, keys, scaling):
    model = actor_from_yaml(tmp_path, **keys)
    randomize_lora(model, std=0.2)
    layers = list(iter_lora_layers(model))
    assert layers
    x = torch.randn(5, layers[0][1].in_features)
    for path, layer in layers:
        assert layer.r == 4 and layer.lora_A.weight.shape[0] == 4, path
        assert layer.scaling == scaling, path
    path, layer = layers[0]
    got = layer(x)
    assert torch.allclose(got.double(), reference_output(layer, x, scaling), rtol=1e-4, atol=1e-5), path
    # the LoRA term is large enough that a 1 % scaling error is seen
    assert not torch.allclose(got.double(), reference_output(layer, x, scaling * 1.01), rtol=1e-4, atol=1e-5)


def test_dropout_is_active_in_train_and_off_in_eval(tmp_path):
    model = actor_from_yaml(tmp_path, lora_dropout=0.5)
    randomize_lora(model, std=0.2)
    _, layer = next(iter(iter_lora_layers(model)))
    assert all(lay.lora_dropout == 0.5 for _, lay in iter_lora_layers(model))
    x = torch.randn(64, layer.in_features)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    assert torch.allclose(layer(x).double(), reference_output(layer, x, layer.scaling), rtol=1e-4, atol=1e-5)
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert not torch.allclose(y1, y2)  # a fresh mask each call
    with adapter_disabled(model):  # dropout is on the LoRA branch only
        assert torch.equal(layer(x), layer.base_layer(x))
    # inverted dropout on the LoRA input: the mean over many masks is the eval output
    with torch.no_grad():
        mean = torch.stack([layer(x) for _ in range(400)]).mean(0)
        layer.eval()
        lora_part = (layer(x) - layer.base_layer(x)).abs().mean()
        assert (mean - layer(x)).abs().mean() < 0.1 * lora_part


def test_target_and_exclude_modules_choose_the_patched_layers(tmp_path):
    model = actor_from_yaml(tmp_path, target_modules=["q_proj", "fc1", "lm_head"],
                            exclude_modules=["lm_head", "projector.fc1"])
    patched = {p for p, _ in iter_lora_layers(model)}
    assert patched and all(p.endswith(("q_proj", "fc1")) for p in patched)
    assert not any(p.endswith("lm_head") for p in patched)
    assert "projector.fc1" not in patched
    assert type(model.get_submodule("projector.fc1")) is nn.Linear
    assert type(model.get_submodule("language_model.lm_head")) is nn.Linear
    assert any(p.startswith("vision.") and p.endswith("fc1") for p in patched)


@pytest.mark.parametrize("init", ["gaussian", "kaiming"])
def test_init_lora_weights_statistics(tmp_path, init):
    model = actor_from_yaml(tmp_path, lora_rank=4, init_lora_weights=init)
    values, bound_ok = [], True
    for _, layer in iter_lora_layers(model):
        a = layer.lora_A.weight.detach()
        assert torch.count_nonzero(layer.lora_B.weight) == 0  # B is zero either way
        values.append(a.flatten() * math.sqrt(layer.in_features))  # kaiming: U(-1, 1) after this
        bound_ok &= bool(a.abs().max() <= 1.0 / math.sqrt(layer.in_features) + 1e-7)
    if init == "gaussian":  # N(0, 1/r): std 0.25 at r = 4, whatever the width
        a_all = torch.cat([lay.lora_A.weight.detach().flatten() for _, lay in iter_lora_layers(model)])
        assert a_all.std().item() == pytest.approx(0.25, rel=0.05)
        assert not bound_ok
    else:  # kaiming-uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)), std 1/sqrt(3 in)
        scaled = torch.cat(values)
        assert bound_ok
        assert scaled.std().item() == pytest.approx(1 / math.sqrt(3), rel=0.05)


@pytest.fixture
def llama_folder(tmp_path):
    make_tiny_llama(layers=1).save_pretrained(tmp_path / "llama", safe_serialization=True)
    return tmp_path / "llama"


def test_rslora_alpha_and_exclusions_survive_save_peft_and_reload(tmp_path, llama_folder):
    from peft import PeftModel

    keys = {"lora_rank": 4, "lora_alpha": 8, "use_rslora": True, "exclude_modules": ["lm_head", "k_proj"]}
    model = actor_from_yaml(tmp_path / "a", base=llama_folder, **keys)
    randomize_lora(model, std=0.1)
    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_NAME).read_text())
    assert saved["use_rslora"] is True and saved["r"] == 4 and saved["lora_alpha"] == 8
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = model.eval()(input_ids=ids).logits

    peft = PeftModel.from_pretrained(make_tiny_llama(layers=1), tmp_path / "adapter").eval()
    assert torch.allclose(peft(input_ids=ids).logits, ours, atol=1e-5)

    again = actor_from_yaml(tmp_path / "b", base=llama_folder, lora_rank=4,
                            lora_path=str(tmp_path / "adapter"))
    layers = dict(iter_lora_layers(again))
    assert layers.keys() == dict(iter_lora_layers(model)).keys()
    assert not any(p.endswith(("lm_head", "k_proj")) for p in layers)
    for path, layer in layers.items():
        assert layer.use_rslora and layer.scaling == 8 / math.sqrt(4), path  # 4.0, not alpha / r = 2.0
    assert torch.allclose(again.eval()(input_ids=ids).logits, ours, atol=1e-6)


# ---- trainer keys, through YAML -> load_config -> train -------------------------------


def train_yaml(tmp_path, base_dir, name, **trainer):
    raw = untrained_raw(tmp_path / name, base_dir, **trainer)
    cfg = load_config(write_yaml(tmp_path / f"{name}.yaml", raw))
    torch.manual_seed(0)  # the same starting adapters for every run of a test
    return cfg


def adapter_tensors(out) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "adapter", ADAPTER_WEIGHTS_NAME))


@pytest.mark.slow
def test_weight_decay_shrinks_the_adapters_by_lr_times_decay(tmp_path, base_dir):
    # step 1: B = 0, so A's gradient and Adam's update of A are exactly zero; only the
    # decoupled decay moves A: A1 = A0 * (1 - lr * weight_decay)
    runs = {}
    for wd in (0.0, 0.5):
        cfg = train_yaml(tmp_path, base_dir, f"wd{wd}", steps=1, lr=0.1, weight_decay=wd)
        runs[wd] = adapter_tensors(train(cfg, log=quiet).output_dir)
    a_keys = [k for k in runs[0.0] if ".lora_A." in k]
    assert a_keys
    for k in a_keys:
        assert torch.allclose(runs[0.5][k], runs[0.0][k] * (1 - 0.1 * 0.5), rtol=1e-6, atol=0), k


@pytest.mark.slow
def test_max_grad_norm_clips_the_update(tmp_path, base_dir):
    # Adam's first step moves each parameter by lr * g / (|g| + 1e-8): about lr for an
    # unclipped gradient, at most lr / 11 once the whole gradient is clipped to norm 1e-9
    moved = {}
    for norm in (100.0, 1e-9):
        cfg = train_yaml(tmp_path, base_dir, f"n{norm}", steps=1, lr=0.1, max_grad_norm=norm, kl_coef=0.0)
        tensors = adapter_tensors(train(cfg, log=quiet).output_dir)
        moved[norm] = max(t.abs().max().item() for k, t in tensors.items() if ".lora_B." in k)
    assert moved[100.0] > 0.09
    assert 0 < moved[1e-9] <= 0.1 / 11 * 1.001


@pytest.mark.slow
def test_update_epochs_and_clip_eps_reach_the_loss(tmp_path, base_dir, monkeypatch):
    seen = []
    real = learners.grpo_loss

    def spy(logp, old_logp, advantages, kl, clip_eps, kl_coef, **weights):
        seen.append((clip_eps, kl_coef))
        return real(logp, old_logp, advantages, kl, clip_eps, kl_coef, **weights)

    monkeypatch.setattr(learners, "grpo_loss", spy)
    clip = {}
    for epochs, eps in ((1, 0.05), (3, 0.05), (3, 50.0)):
        cfg = train_yaml(tmp_path, base_dir, f"e{epochs}_{eps}", steps=2, lr=0.05,
                         update_epochs=epochs, clip_eps=eps, kl_coef=0.25)
        seen.clear()
        result = train(cfg, log=quiet)
        assert seen == [(eps, 0.25)] * (2 * epochs)
        clip[epochs, eps] = max(r["clip_frac"] for r in _metrics(result.output_dir))
    assert clip[1, 0.05] == 0.0  # one update: the ratio is exactly 1
    assert clip[3, 0.05] > 0.0  # later updates leave [0.95, 1.05]
    assert clip[3, 50.0] == 0.0  # nothing is outside [-49, 51]


@pytest.mark.slow
def test_temperature_reaches_sampling_and_scoring(tmp_path, base_dir, monkeypatch):
    temps = []
    real = rl_policy.action_dist

    def spy(model, family, inputs, positions, action_ids, temperature):
        temps.append(temperature)
        return real(model, family, inputs, positions, action_ids, temperature)

    monkeypatch.setattr(rl_policy, "action_dist", spy)
    cfg = train_yaml(tmp_path, base_dir, "t", steps=1, temperature=0.7)
    train(cfg, log=quiet)
    # 2 action tokens sampled, the reference scored, the policy re-scored: all at 0.7
    assert len(temps) == 4 and set(temps) == {0.7}


@pytest.mark.slow
def test_save_every_writes_intermediate_checkpoints(tmp_path, base_dir):
    seen = {}
    for every in (0, 2):
        out = tmp_path / f"s{every}"
        steps = []

        def on_step(record, out=out, steps=steps):
            meta = out / "train_state" / "meta.json"
            steps.append(json.loads(meta.read_text())["step"] if meta.exists() else None)

        cfg = train_yaml(tmp_path, base_dir, f"s{every}", steps=5, save_every=every)
        train(cfg, log=quiet, on_step=on_step)
        seen[every] = steps
    assert seen[0] == [None] * 5  # only at the end
    assert seen[2] == [None, None, 2, 2, 4]  # after steps 2 and 4 (step 5 is the final save)


def _metrics(out):
    from lora_runtime.rl.outputs import read_metrics

    return read_metrics(os.path.join(out, "metrics.jsonl"))


def test_prepare_actor_refuses_a_patched_model_and_leaves_it_alone(tmp_path):
    from lora_runtime.actor import prepare_actor
    from lora_runtime.config import ActorModelConfig

    model = actor_from_yaml(tmp_path, lora_rank=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^prepare_actor: the model is already patched; pass the base model$"):
        prepare_actor(model, ActorModelConfig(is_lora=True, lora_rank=8))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(layer.r == 4 for _, layer in iter_lora_layers(model))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_adapter_dtype_casts_the_adapters_only_new_and_resume(tmp_path, dtype):
    """`actor.model.adapter_dtype`: every lora_A / lora_B in that dtype, the base untouched
    (float32), trainable; a resumed adapter holds the saved values rounded to that dtype."""
    want = getattr(torch, dtype)
    saved_from = actor_from_yaml(tmp_path / "src", lora_rank=4)
    randomize_lora(saved_from, std=0.2)  # non-zero B
    save_adapter(saved_from, tmp_path / "adapter")
    new = actor_from_yaml(tmp_path / "new", lora_rank=4, adapter_dtype=dtype)
    resumed = actor_from_yaml(tmp_path / "resume", lora_rank=4, adapter_dtype=dtype, lora_path=str(tmp_path / "adapter"))
    for model in (new, resumed):
        layers = dict(iter_lora_layers(model))
        assert layers
        for name, layer in layers.items():
            assert layer.lora_A.weight.dtype == want and layer.lora_B.weight.dtype == want, name
            assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad, name
            assert layer.base_layer.weight.dtype == torch.float32 and not layer.base_layer.weight.requires_grad, name
    source = dict(iter_lora_layers(saved_from))
    for name, layer in iter_lora_layers(resumed):
        for kind in ("lora_A", "lora_B"):
            expected = getattr(source[name], kind).weight.detach().to(want)
            assert torch.equal(getattr(layer, kind).weight.detach(), expected), (name, kind)


def test_prepare_actor_seed_is_a_generator_shorthand_and_not_both(tmp_path):
    from lora_runtime.actor import prepare_actor
    from lora_runtime.config import ActorModelConfig

    cfg = ActorModelConfig(is_lora=True, lora_rank=4, init_lora_weights="gaussian")
    by_seed = prepare_actor(make_tiny_llama(layers=1), cfg, seed=3)
    by_generator = prepare_actor(make_tiny_llama(layers=1), cfg, generator=torch.Generator().manual_seed(3))
    a, b = by_seed.state_dict(), by_generator.state_dict()
    assert any("lora_A" in k for k in a)  # patched; A is drawn from the generator
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = prepare_actor(make_tiny_llama(layers=1), cfg, seed=4).state_dict()
    assert not all(torch.equal(a[k], other[k]) for k in a if "lora_A" in k)  # the seed is used
    base = make_tiny_llama(layers=1)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"^prepare_actor: pass generator or seed, not both$"):
        prepare_actor(base, cfg, seed=3, generator=torch.Generator())
    assert not list(iter_lora_layers(base)) and all(torch.equal(base.state_dict()[k], before[k]) for k in before)
