"""The built-in actor: names for the default targets, shapes, a float64 Llama reference,
deterministic init, and model folders in Hugging Face layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_runtime.adapters import (
    DEFAULT_TARGETS,
    LoRALinear,
    apply_lora,
    iter_lora_layers,
)
from lora_runtime.adapters.targets import matches_target
from lora_runtime.config import BuiltinActorConfig, ConfigError
from lora_runtime.rl.models import load_model_folder, read_model_folder, save_model_folder, vla
from lora_runtime.rl.models.vla import MODEL_TYPE, TinyVLA, build_tiny_vla

SIZES = {
    "image_size": 8, "patch_size": 4, "vision_dim": 32, "vision_layers": 2, "vision_heads": 2,
    "vision_mlp_dim": 48, "pool_latents": 2, "text_dim": 32, "text_layers": 2, "text_heads": 2,
    "text_mlp_dim": 48, "vocab_size": 24, "max_text_len": 8,
}


def tiny(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyVLA:
    return build_tiny_vla(BuiltinActorConfig(seed=seed, **SIZES)).to(dtype).eval()


def inputs(n: int = 3, t: int = 5, seed: int = 0, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, 8, 8, generator=gen, dtype=dtype)  # [n, 3, H, W]
    ids = torch.randint(0, 24, (n, t), generator=gen)  # [n, T]
    return pixels, ids


def test_every_default_target_matches_a_linear_module():
    model = tiny()
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for target in DEFAULT_TARGETS:
        hits = [name for name in linears if matches_target(name, [target])]
        assert hits, f"default target {target!r} matches no nn.Linear of the built-in actor"
    expected = {
        "vision.blocks.0.attn.qkv", "vision.blocks.1.attn.proj", "vision.blocks.0.mlp.fc1",
        "vision.blocks.0.mlp.fc2", "vision.head.q", "vision.head.kv", "vision.head.proj",
        "projector.fc1", "projector.fc2", "projector.fc3",
        "language_model.layers.1.self_attn.q_proj", "language_model.layers.1.self_attn.o_proj",
        "language_model.layers.0.mlp.gate_proj", "language_model.layers.0.mlp.down_proj",
        "language_model.lm_head",
    }
    assert expected <= set(linears)


def test_apply_lora_patches_every_linear_but_the_patch_embedding():
    model = tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no target name hits a non-Linear module
        apply_lora(model, rank=4)
    patched = {name for name, _ in iter_lora_layers(model)}
    plain = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".lora_" not in n and not n.endswith("base_layer")}
    assert plain == {"vision.patch_embed"}
    assert len(patched) == 2 * 4 + 2 + 3 + 3 + 2 * 7 + 1  # ViT blocks, pool mlp, pool q/kv/proj, projector, decoder, head


def test_forward_shapes_and_image_repeats():
    model = tiny()
    pixels, _ = inputs(2)
    ids = torch.randint(0, 24, (6, 4), generator=torch.Generator().manual_seed(1))  # 3 rows per image
    out = model(pixels, ids, image_repeats=3)
    assert out.shape == (6, 4, 24)
    ref = model(pixels.repeat_interleave(3, dim=0), ids)
    torch.testing.assert_close(out, ref)


def test_decoder_is_causal_and_reads_image_and_text():
    model = tiny()
    pixels, ids = inputs(2, 5)
    base = model(pixels, ids)
    later = ids.clone()
    later[:, -1] = (later[:, -1] + 1) % 24
    changed = model(pixels, later)
    torch.testing.assert_close(changed[:, :-1], base[:, :-1])  # earlier positions do not see the future
    assert not torch.allclose(changed[:, -1], base[:, -1])
    other_image = model(torch.rand_like(pixels), ids)
    assert not torch.allclose(other_image, base)


def test_language_model_equals_transformers_llama_in_float64():
    """The decoder is Llama: same names, same math as transformers' LlamaForCausalLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny(dtype=torch.float64)
    lm = model.language_model
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=24, max_position_embeddings=64, rms_norm_eps=1e-6,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    cfg._attn_implementation = "eager"
    llama = LlamaForCausalLM(cfg).to(torch.float64).eval()
    state = {f"model.{k}": v for k, v in lm.state_dict().items() if not k.startswith("lm_head")}
    state["lm_head.weight"] = lm.lm_head.weight
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    pixels, ids = inputs(2, 5, dtype=torch.float64)
    prefix = model.encode_images(pixels)  # [2, V, 32]
    embeds = torch.cat([prefix, lm.embed_tokens(ids)], dim=1)
    with torch.no_grad():
        ref = llama(inputs_embeds=embeds).logits[:, prefix.shape[1]:]
        ours = model(pixels, ids)
    # transformers runs RMSNorm and the rotary angles in float32 even for float64 weights
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def _attention_reference(x: torch.Tensor, qkv: nn.Linear, proj: nn.Linear, heads: int) -> torch.Tensor:
    d = x.shape[-1]
    q, k, v = F.linear(x, qkv.weight, qkv.bias).split(d, dim=-1)
    outs = []
    for h in range(heads):
        sl = slice(h * d // heads, (h + 1) * d // heads)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / (d // heads) ** 0.5  # [B, N, N]
        outs.append(torch.softmax(scores, dim=-1) @ v[..., sl])
    return F.linear(torch.cat(outs, dim=-1), proj.weight, proj.bias)


def test_vit_attention_matches_float64_reference():
    model = tiny(dtype=torch.float64)
    attn = model.vision.blocks[0].attn
    x = torch.randn(2, 4, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(attn(x), _attention_reference(x, attn.qkv, attn.proj, 2), rtol=1e-10, atol=1e-10)


def test_gelu_is_the_exact_erf_gelu():
    """float32 within a few ulps of float64's exact GELU, gradients included."""
    x64 = torch.linspace(-8, 8, 4001, dtype=torch.float64, requires_grad=True)
    want = F.gelu(x64)
    (grad_want,) = torch.autograd.grad(want.sum(), x64)
    x32 = x64.detach().float().requires_grad_()
    got = vla.gelu(x32)
    (grad_got,) = torch.autograd.grad(got.sum(), x32)
    torch.testing.assert_close(got.double(), want.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_got.double(), grad_want, rtol=0, atol=2e-6)


ONEDNN_SCENARIO = """
import torch
from lora_runtime.config import BuiltinActorConfig
from lora_runtime.rl.models.vla import build_tiny_vla
torch.manual_seed(0)
model = build_tiny_vla(BuiltinActorConfig(seed=0, **{sizes!r}))
for rows, tokens in [(1, 3), (2, 5), (5, 4)]:
    pixels, ids = torch.rand(rows, 3, 8, 8), torch.randint(0, 24, (rows, tokens))
    model(pixels, ids).float().sum().backward()
print("forward and backward done")
"""


def test_forward_and_backward_run_no_onednn_primitive():
    """oneDNN caches a JIT primitive per input shape (what grew RSS over an RL run); the
    built-in actor runs none, at any batch shape, forward or backward."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "DNNL_VERBOSE": "1"}
    run = subprocess.run([sys.executable, "-c", ONEDNN_SCENARIO.format(sizes=SIZES)], capture_output=True,
                         text=True, env=env, check=True)
    assert "forward and backward done" in run.stdout
    executed = [line for line in run.stdout.splitlines() if ",primitive,exec," in line]
    assert executed == [], executed[:3]


def test_lora_paths_are_live_in_the_actor_float64():
    """With random non-zero adapters the actor equals the base with W + s * B @ A folded in."""
    model = tiny(dtype=torch.float64)
    folded = tiny(dtype=torch.float64)
    apply_lora(model, rank=4, alpha=8)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for path, layer in iter_lora_layers(model):
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=gen, dtype=torch.float64) * 0.1)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen, dtype=torch.float64) * 0.1)
            target = folded.get_submodule(path)
            target.weight += layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    pixels, ids = inputs(2, 5, dtype=torch.float64)
    out = model(pixels, ids)
    torch.testing.assert_close(out, folded(pixels, ids), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(out, tiny(dtype=torch.float64)(pixels, ids))


def test_init_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = tiny(seed=5), tiny(seed=5), tiny(seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.language_model.lm_head.weight, c.language_model.lm_head.weight)


def test_sizes_are_validated():
    with pytest.raises(ValueError, match="image_size=10 is not a multiple of patch_size=4"):
        BuiltinActorConfig(image_size=10, patch_size=4)
    with pytest.raises(ValueError, match="text_dim=30 is not a multiple of text_heads=4"):
        BuiltinActorConfig(text_dim=30, text_heads=4)


def test_model_folder_round_trip(tmp_path):
    model = tiny(seed=2)
    folder = tmp_path / "base"
    save_model_folder(model, str(folder), note="x")
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    cfg = read_model_folder(str(folder))
    assert cfg["model_type"] == MODEL_TYPE and cfg["note"] == "x" and cfg["builtin"]["vision_dim"] == 32
    loaded = load_model_folder(str(folder))
    assert isinstance(loaded, TinyVLA)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no staging folder left


def test_model_folder_replace_is_complete(tmp_path):
    folder = str(tmp_path / "m")
    save_model_folder(tiny(seed=1), folder)
    save_model_folder(tiny(seed=2), folder)
    assert torch.equal(load_model_folder(folder).language_model.lm_head.weight, tiny(seed=2).language_model.lm_head.weight)
    assert os.listdir(tmp_path) == ["m"]


def test_transformers_folder_loads_offline(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "llama", safe_serialization=True)
    loaded = load_model_folder(str(tmp_path / "llama"))
    assert type(loaded).__name__ == "LlamaForCausalLM"
    for (name, a), b in zip(tiny_llama.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("x"), "is a file, not a model folder"),
        (lambda p: p.mkdir(), "has no config.json"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text("{bad")), "not valid JSON"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text("{}"), (p / "pytorch_model.bin").write_text("")),
         "has no \\*.safetensors weights .it has PyTorch .bin files"),
    ],
)
def test_bad_model_folders_are_named(tmp_path, make, match):
    path = tmp_path / "model"
    make(path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ConfigError, match=f"actor.model.model_path='{path}'.*{match}|{match}"):
        load_model_folder(str(path))
    assert sorted(os.listdir(tmp_path)) == before


def test_builtin_folder_with_wrong_weights_is_refused(tmp_path):
    folder = tmp_path / "m"
    save_model_folder(tiny(), str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["builtin"]["text_layers"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="does not fit the sizes"):
        load_model_folder(str(folder))


def test_lora_layers_keep_names_peft_expects():
    model = tiny()
    apply_lora(model, rank=2, target_modules=["q_proj", "lm_head"])
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert "language_model.lm_head.lora_A.weight" in names
    assert "language_model.layers.0.self_attn.q_proj.lora_B.weight" in names
    assert isinstance(model.language_model.lm_head, LoRALinear)
