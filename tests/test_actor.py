"""Registry on a tiny transformers Llama: targets, modes, trainability, removal."""

from __future__ import annotations

import copy

import pytest
import torch
from support.models import LLAMA_LINEARS, make_tiny_llama, randomize_lora
from support.numerics import rel_err
from torch import nn

from lora_runtime.actor import prepare_actor
from lora_runtime.adapters import (
    LoRALinear,
    apply_lora,
    iter_lora_layers,
    remove_lora,
    trainable_summary,
)
from lora_runtime.adapters.targets import matches_target
from lora_runtime.config import DEFAULT_TARGETS, ActorModelConfig


def test_matching_is_on_dot_boundaries():
    assert matches_target("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert matches_target("vit.blocks.0.attn.proj", ["attn.proj"])
    assert not matches_target("model.layers.0.self_attn.q_proj", ["proj"])
    assert not matches_target("encoder.kv_cache", ["kv"])
    assert matches_target("head.kv", ["kv"])


def test_new_mode_bit_identical_and_patches_exactly_the_targets(tiny_llama, token_ids):
    base = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        ref = base(token_ids).logits
    model = prepare_actor(tiny_llama, ActorModelConfig(is_lora=True, lora_rank=8))
    with torch.no_grad():
        assert torch.equal(model(token_ids).logits, ref)
    expected = {n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in DEFAULT_TARGETS}
    assert expected == {n for n, _ in iter_lora_layers(model)}
    assert len(expected) == 2 * len(LLAMA_LINEARS) + 1  # + lm_head
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{k}.weight" for n in expected for k in "AB"}
    # Only adapters receive gradients.
    model.train()
    model(token_ids).logits.sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_trained_adapter_changes_logits(tiny_llama, token_ids):
    ref = tiny_llama(token_ids).logits.detach()
    apply_lora(tiny_llama, 4)
    randomize_lora(tiny_llama)
    assert not torch.allclose(tiny_llama(token_ids).logits, ref, atol=1e-4)


def test_full_mode_patches_nothing_all_trainable(tiny_llama):
    for p in tiny_llama.parameters():
        p.requires_grad_(False)
    model = prepare_actor(tiny_llama, ActorModelConfig(is_lora=False, lora_rank=4))
    assert not list(iter_lora_layers(model))
    assert all(p.requires_grad for p in model.parameters())
    summary = trainable_summary(model)
    assert summary.trainable == summary.total > 0
    assert summary.percentage == 100.0


def test_trainable_summary_string(tiny_llama):
    apply_lora(tiny_llama, 4, target_modules=["q_proj"])
    from lora_runtime.adapters import mark_only_lora_trainable

    mark_only_lora_trainable(tiny_llama)
    s = trainable_summary(tiny_llama)
    assert s.trainable == 2 * (4 * 64 + 64 * 4)
    assert str(s).startswith(f"trainable params: {s.trainable:,d} || all params: {s.total:,d} || trainable%: ")


def test_non_linear_targets_are_skipped_with_one_warning():
    model = nn.Sequential()
    model.add_module("proj", nn.Conv1d(4, 4, 1))
    model.add_module("fc1", nn.Linear(4, 4))
    with pytest.warns(UserWarning, match=r"not nn.Linear: proj \(Conv1d\)"):
        apply_lora(model, 2)
    assert isinstance(model.fc1, LoRALinear) and isinstance(model.proj, nn.Conv1d)


def test_no_match_lists_targets_and_linears(tiny_llama):
    before = copy.deepcopy(tiny_llama.state_dict())
    with pytest.raises(ValueError, match=r"no nn.Linear module matches target_modules=\['nothing'\].*model.layers.0.self_attn.q_proj"):
        apply_lora(tiny_llama, 4, target_modules=["nothing"])
    assert not list(iter_lora_layers(tiny_llama))
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())


def test_rank_too_large_names_module_and_patches_nothing(tiny_llama):
    with pytest.raises(ValueError, match=r"module .model.layers.0.self_attn.q_proj.: rank r=65 does not fit Linear\(64, 64\)"):
        apply_lora(tiny_llama, 65)
    assert not list(iter_lora_layers(tiny_llama))


def test_exclude_modules(tiny_llama):
    apply_lora(tiny_llama, 4, exclude_modules=["lm_head", "layers.1.mlp.down_proj"])
    names = {n for n, _ in iter_lora_layers(tiny_llama)}
    assert "lm_head" not in names and "model.layers.1.mlp.down_proj" not in names
    assert "model.layers.0.mlp.down_proj" in names


def test_remove_lora_merge_and_unmerge(token_ids):
    base = make_tiny_llama()
    with torch.no_grad():
        ref_base = base(token_ids).logits
    model = copy.deepcopy(base)
    apply_lora(model, 4, alpha=8)
    randomize_lora(model)
    with torch.no_grad():
        ref_lora = model(token_ids).logits
    unmerged = remove_lora(copy.deepcopy(model), merge=False)
    assert not list(iter_lora_layers(unmerged))
    with torch.no_grad():
        assert torch.equal(unmerged(token_ids).logits, ref_base)
    merged = remove_lora(model, merge=True)
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        out = merged(token_ids).logits
    assert rel_err(out, ref_lora) < 1e-5


def test_remove_lora_refuses_non_finite_merge(tiny_llama):
    apply_lora(tiny_llama, 4)
    layer = tiny_llama.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter 'model.layers.0.mlp.up_proj.lora_B.weight' has 1 non-finite"):
        remove_lora(tiny_llama, merge=True)
    assert len(list(iter_lora_layers(tiny_llama))) == 15
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k], ) or torch.isnan(before[k]).any() for k in before)


def test_prepare_actor_refuses_a_patched_model(tiny_llama):
    apply_lora(tiny_llama, 4)
    with pytest.raises(ValueError, match="already patched"):
        prepare_actor(tiny_llama, ActorModelConfig(is_lora=True, lora_rank=4))
