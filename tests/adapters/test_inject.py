"""`apply_lora` / `remove_lora` (`adapters/inject.py`) on small hand-built models: every
argument reaching the layers, the adapters drawn against independently drawn references,
the exact error messages, nothing patched after a refusal, and the unpatching paths."""

from __future__ import annotations

import math

import pytest
import torch
from support.models import randomize_lora
from torch import nn

from lora_runtime.adapters import LoRALinear, apply_lora, iter_lora_layers, merged, remove_lora


def two_block_model(widths=(8, 6, 4)) -> nn.Module:
    """`blocks.{0,1}.proj` (Linear) and `blocks.{0,1}.norm`; `blocks.1.proj` is the narrow one."""
    torch.manual_seed(0)
    model = nn.Module()
    model.blocks = nn.ModuleList()
    for i in range(2):
        b = nn.Module()
        b.proj = nn.Linear(widths[i], widths[i + 1])
        b.norm = nn.LayerNorm(widths[i + 1])
        model.blocks.append(b)
    return model


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_defaults_reach_every_layer_and_draw_from_the_default_generator():
    model = two_block_model()
    base = linears(model)
    torch.manual_seed(11)
    out = apply_lora(model, 2)
    assert out is model
    layers = dict(iter_lora_layers(model))
    assert list(layers) == ["blocks.0.proj", "blocks.1.proj"]  # "proj" is a default target
    # reference: the layers built one by one in module order after the same seed (apply_lora
    # draws nothing more from the default generator)
    spare = {n: nn.Linear(layer.in_features, layer.out_features) for n, layer in layers.items()}
    torch.manual_seed(11)
    for name, layer in layers.items():
        assert layer.base_layer is base[name]
        assert (layer.r, layer.lora_alpha, layer.scaling) == (2, 2.0, 1.0)
        assert (layer.lora_dropout, layer.use_rslora, layer.init) == (0.0, False, "gaussian")
        expected = LoRALinear(spare[name], 2).lora_A.weight
        assert torch.equal(layer.lora_A.weight, expected), name
        assert torch.equal(layer.lora_B.weight, torch.zeros(layer.out_features, 2))


@pytest.mark.parametrize("init", ["gaussian", "kaiming"])
def test_arguments_reach_the_layers_and_a_generator_draws_every_lora_a(init):
    model = two_block_model()
    torch.manual_seed(5)
    default_draw = torch.randn(())  # what the default generator gives next
    torch.manual_seed(5)
    apply_lora(model, 3, alpha=6, dropout=0.25, init=init, use_rslora=True,
               target_modules=["proj"], generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    for name, layer in iter_lora_layers(model):
        assert (layer.r, layer.lora_alpha, layer.lora_dropout, layer.use_rslora, layer.init) == (3, 6.0, 0.25, True, init)
        assert layer.scaling == pytest.approx(6 / math.sqrt(3), rel=1e-15)
        expected = torch.empty(3, layer.in_features)
        if init == "gaussian":
            expected.normal_(0.0, 1.0 / 3, generator=gen)
        else:  # kaiming-uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
            expected.uniform_(-1 / math.sqrt(layer.in_features), 1 / math.sqrt(layer.in_features), generator=gen)
        assert torch.allclose(layer.lora_A.weight, expected, rtol=0, atol=1e-7), name
        assert not layer.lora_B.weight.any()
    # the generator's draws do not replace the default generator's (each layer's __init__ used it)
    assert not torch.equal(torch.randn(()), default_draw)


def test_a_regex_string_a_tuple_and_exclusions_pick_the_layers():
    model = two_block_model()
    apply_lora(model, 1, target_modules=r"blocks\.1\.proj")  # a string: one regex, not characters
    assert [n for n, _ in iter_lora_layers(model)] == ["blocks.1.proj"]
    model = two_block_model()
    apply_lora(model, 1, target_modules=iter(("proj",)), exclude_modules=iter(["0.proj"]))
    assert [n for n, _ in iter_lora_layers(model)] == ["blocks.1.proj"]


def test_a_wrapped_model_is_patched_inside_and_returned_as_given():
    model = two_block_model()
    wrapper = torch.compile(model)  # an OptimizedModule, never run
    assert apply_lora(wrapper, 1) is wrapper
    assert [n for n, _ in iter_lora_layers(model)] == ["blocks.0.proj", "blocks.1.proj"]
    assert isinstance(model.blocks[0].proj, LoRALinear)


def many_linears(n: int) -> nn.Module:
    return nn.Sequential(*[nn.Linear(2, 2) for _ in range(n)])


@pytest.mark.parametrize("n, listed", [
    (0, "none"),
    (3, "0, 1, 2"),
    (10, "0, 1, 2, 3, 4, 5, 6, 7, 8, 9"),
    (11, "0, 1, 2, 3, 4, 5, 6, 7, 8, 9 ..."),
])
def test_no_match_message_lists_up_to_ten_linears_and_patches_nothing(n, listed):
    model = many_linears(n)
    before = state(model)
    with pytest.raises(ValueError) as err:
        apply_lora(model, 1, target_modules=("nothing",), exclude_modules=("0",))
    assert str(err.value) == (
        "apply_lora: no nn.Linear module matches target_modules=['nothing'] "
        f"(exclude_modules=['0']). Linear modules in this model: {listed}"
    )
    assert not list(iter_lora_layers(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_no_match_with_a_regex_and_with_everything_excluded():
    with pytest.raises(ValueError) as err:
        apply_lora(many_linears(2), 1, target_modules=r"\d+x")
    assert "target_modules='\\\\d+x' (exclude_modules=[]). Linear modules in this model: 0, 1" in str(err.value)
    with pytest.raises(ValueError, match=r"target_modules=\['0', '1'\] \(exclude_modules=\['0', '1'\]\)"):
        apply_lora(many_linears(2), 1, target_modules=["0", "1"], exclude_modules=["0", "1"])


def test_a_rank_that_fits_only_some_layers_names_the_first_misfit_and_patches_nothing():
    model = two_block_model((8, 6, 4))  # blocks.0.proj Linear(8, 6); blocks.1.proj Linear(6, 4)
    before = state(model)
    base = linears(model)
    with pytest.raises(ValueError) as err:
        apply_lora(model, 5)
    assert str(err.value) == (
        "apply_lora: module 'blocks.1.proj': rank r=5 does not fit Linear(6, 4): "
        "allowed 1 <= r <= min(in, out) = 4"
    )
    assert not list(iter_lora_layers(model)) and linears(model) == base
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    apply_lora(model, 4)  # the largest rank that fits every layer
    assert [layer.r for _, layer in iter_lora_layers(model)] == [4, 4]


def randomized(seed: int = 3) -> nn.Module:
    model = two_block_model()
    apply_lora(model, 2, alpha=5)  # scaling 2.5
    randomize_lora(model, std=0.5, seed=seed)
    return model


def test_remove_lora_without_merge_puts_the_original_modules_back():
    model = randomized()
    base = {n: (layer.base_layer, layer.base_layer.weight.detach().clone()) for n, layer in iter_lora_layers(model)}
    assert remove_lora(model, merge=False) is model
    assert not list(iter_lora_layers(model))
    for name, (module, weight) in base.items():
        assert model.get_submodule(name) is module and torch.equal(module.weight, weight)


def test_remove_lora_with_merge_folds_against_a_float64_reference():
    model = randomized()
    expected = {
        n: (layer.base_layer.weight.double() + 2.5 * layer.lora_B.weight.double() @ layer.lora_A.weight.double()).float()
        for n, layer in iter_lora_layers(model)
    }
    assert remove_lora(model, merge=True) is model
    assert not list(iter_lora_layers(model))
    for name, want in expected.items():
        got = model.get_submodule(name)
        assert type(got) is nn.Linear
        assert torch.allclose(got.weight, want, rtol=0, atol=1e-6), name
        assert (got.weight - want).abs().max() < 0.01 * (want - linears(two_block_model())[name].weight).abs().max()


def test_remove_lora_on_an_unpatched_model_changes_nothing_either_way():
    model = two_block_model()
    before = state(model)
    for merge in (False, True):
        assert remove_lora(model, merge=merge) is model
        assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("merge", [False, True])
def test_remove_lora_inside_merged_is_refused_and_nothing_changes(merge):
    model = randomized()
    before = state(model)
    with merged(model):
        inside = state(model)
        with pytest.raises(RuntimeError) as err:
            remove_lora(model, merge=merge)
        assert str(err.value) == (
            "remove_lora: layer 'blocks.0.proj' is merged by merged(...); leave that context first"
        )
        assert [n for n, _ in iter_lora_layers(model)] == ["blocks.0.proj", "blocks.1.proj"]
        assert all(torch.equal(inside[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
