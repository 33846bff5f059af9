"""Weight sync for rollout engines: iter_merged_weights (full merged model, one layer at a
time) and adapter_state_dict (adapters only, PEFT names)."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from support.models import make_patched_model, make_tiny_llama
from torch import nn

from lora_runtime.adapters import (
    LoRALinear,
    MergeError,
    adapter_disabled,
    adapter_state_dict,
    apply_lora,
    iter_lora_layers,
    iter_merged_weights,
    merge_lora,
    merged,
)
from lora_runtime.adapters.peft_format import PEFT_PREFIX


def make_model(kind: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    return make_patched_model(kind, dtype)


def snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Values and version counters (which any in-place write bumps)."""
    state = model.state_dict(keep_vars=True)
    return {k: (v.detach().clone(), v._version) for k, v in state.items()}


def assert_untouched(model: nn.Module, before: dict[str, tuple[torch.Tensor, int]]) -> None:
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    for key, (value, version) in before.items():
        assert torch.equal(after[key].view(torch.uint8), value.view(torch.uint8)), key
        assert after[key]._version == version, key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama", "mlp"])
def test_iter_merged_weights_equals_merge_lora_state_dict(kind, dtype):
    model = make_model(kind, dtype)
    before = snapshot(model)
    expected = merge_lora(copy.deepcopy(model)).state_dict()
    items = list(iter_merged_weights(model))
    assert [name for name, _ in items] == list(expected)  # same names, same order
    for name, tensor in items:
        assert tensor.dtype == expected[name].dtype, name
        assert torch.equal(tensor.view(torch.uint8), expected[name].view(torch.uint8)), name
    assert not any("base_layer" in name or "lora_" in name for name, _ in items)
    assert_untouched(model, before)
    assert all(isinstance(layer, LoRALinear) for _, layer in iter_lora_layers(model))


def test_iter_merged_weights_names_match_the_unpatched_model():
    base = make_tiny_llama(layers=1)
    names = [name for name, _ in iter_merged_weights(apply_lora(copy.deepcopy(base), 4))]
    assert names == list(base.state_dict())


def test_iter_merged_weights_merges_one_layer_at_a_time():
    """The generator keeps no merged weight alive once it has moved on."""
    model = make_model("llama")
    lora_weights = {f"{path}.weight" for path, _ in iter_lora_layers(model)}
    it = iter_merged_weights(model)
    previous: weakref.ref | None = None
    merged_seen = 0
    for name, tensor in it:  # CPython frees a tensor when its last reference goes
        if previous is not None:
            assert previous() is None, "a previously merged weight is still referenced"
        previous = None
        if name in lora_weights:
            merged_seen += 1
            previous = weakref.ref(tensor)
        del tensor
    assert merged_seen == len(lora_weights)


def test_iter_merged_weights_shares_unadapted_tensors():
    model = make_model("llama")
    items = dict(iter_merged_weights(model))
    embed = model.model.embed_tokens.weight
    assert items["model.embed_tokens.weight"].data_ptr() == embed.data_ptr()  # no copy
    assert items["model.layers.0.self_attn.q_proj.weight"].data_ptr() != (
        model.model.layers[0].self_attn.q_proj.base_layer.weight.data_ptr()
    )


def test_iter_merged_weights_validates_before_yielding():
    model = make_model("llama")
    with torch.no_grad():
        model.lm_head.lora_A.weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'lm_head\.lora_A\.weight' has 1 non-finite"):
        iter_merged_weights(model)  # raises at the call, before any tensor is produced
    assert_untouched(model, before)


def test_iter_merged_weights_refused_inside_merged_or_adapter_disabled():
    model = make_model("mlp")
    inside_merged = "iter_merged_weights: layer '0' is already merged"
    with merged(model), pytest.raises(MergeError, match=inside_merged):
        iter_merged_weights(model)
    inside_disabled = "iter_merged_weights: .*adapter_disabled"
    with adapter_disabled(model), pytest.raises(MergeError, match=inside_disabled):
        iter_merged_weights(model)


def test_iter_merged_weights_on_a_compiled_wrapper():
    model = make_model("mlp")
    expected = merge_lora(copy.deepcopy(model)).state_dict()
    wrapped = torch.compile(model, backend="eager")  # an OptimizedModule; not run here
    names = [name for name, _ in iter_merged_weights(wrapped)]
    assert names == list(expected)


@pytest.mark.parametrize("kind", ["llama", "mlp"])
def test_adapter_state_dict_holds_only_adapters_in_peft_names(kind):
    model = make_model(kind)
    adapters = adapter_state_dict(model)
    layers = dict(iter_lora_layers(model))
    expected = {
        f"{PEFT_PREFIX}{path}.{key}.weight": getattr(layer, key).weight
        for path, layer in layers.items()
        for key in ("lora_A", "lora_B")
    }
    assert set(adapters) == set(expected)
    for key, tensor in adapters.items():
        assert torch.equal(tensor, expected[key]), key
    full = sum(t.numel() for t in merge_lora(copy.deepcopy(model)).state_dict().values())
    sent = sum(t.numel() for t in adapters.values())
    per_layer = sum(ly.r * (ly.in_features + ly.out_features) for ly in layers.values())
    assert sent == per_layer
    assert sent < full
