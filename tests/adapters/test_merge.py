"""merged(...) (reversible, bit-exact) and merge_lora(...) (permanent) on the tiny Llama and
on a model made only of the runtime's layers, in float32, bfloat16 and float16."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from support.models import make_patched_model
from torch import nn

from lora_runtime.adapters import (
    LoRALinear,
    MergeError,
    MergeStats,
    adapter_disabled,
    apply_lora,
    iter_lora_layers,
    merge_lora,
    merged,
    merged_weight,
    remove_lora,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_model(kind: str, dtype: torch.dtype = torch.float32, std: float = 0.05) -> nn.Module:
    return make_patched_model(kind, dtype, std)


def make_input(kind: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    if kind == "llama":
        return torch.randint(0, 128, (2, 12), generator=gen)  # token ids
    return torch.randn(2, 12, 32, generator=gen).to(dtype)  # [B, T, in]


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key].view(torch.uint8), value.view(torch.uint8)), key


def assert_unmerged(model: nn.Module) -> None:
    for _, layer in iter_lora_layers(model):
        assert not layer.merged and not layer.disable_adapters


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["llama", "mlp"])
def test_merged_computes_merge_and_restores_bit_exactly(kind, dtype):
    model = make_model(kind, dtype)
    x = make_input(kind, dtype)
    before = snapshot(model)
    lora_out = run(model, x)
    reference = merge_lora(copy.deepcopy(model))  # plain nn.Linear, merged weights
    with merged(model) as stats:
        assert all(layer.merged for _, layer in iter_lora_layers(model))
        merged_out = run(model, x)
        for path, layer in iter_lora_layers(model):
            assert torch.equal(layer.base_layer.weight, reference.get_submodule(path).weight), path
    assert torch.equal(merged_out, run(reference, x))
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert (merged_out.float() - lora_out.float()).abs().max() <= tol * lora_out.float().abs().max()
    assert_bit_identical(model, before)  # base weights, biases and adapters, bit for bit
    assert_unmerged(model)
    assert torch.equal(run(model, x), lora_out)
    assert stats.layers == len(list(iter_lora_layers(model)))
    assert 0 < stats.patched_elements < stats.total_elements
    assert stats.extra_bytes < 0.5 * stats.merged_bytes


def test_merged_memory_accounting_matches_what_is_held():
    model = make_model("llama", torch.bfloat16)
    layers = [layer for _, layer in iter_lora_layers(model)]
    with merged(model) as stats:
        pass
    weights = [layer.base_layer.weight for layer in layers]
    assert stats.merged_bytes == sum(w.numel() * 2 for w in weights)
    masks = sum(math.ceil(w.numel() / 8) for w in weights)  # every layer has patches here
    adapters = sum((ly.lora_A.weight.numel() + ly.lora_B.weight.numel()) * 2 for ly in layers)
    assert stats.extra_bytes == masks + adapters + 2 * stats.patched_elements
    assert stats.extra_fraction == pytest.approx(stats.extra_bytes / stats.merged_bytes)


def test_merged_restores_signed_zeros_and_nan_bits():
    layer = LoRALinear(nn.Linear(64, 32, bias=False), 2).to(torch.bfloat16)
    nn.init.normal_(layer.lora_B.weight, std=0.02)
    with torch.no_grad():
        w = layer.base_layer.weight
        w[0, :4] = -0.0
        w[1, 0] = float("nan")
        w[1, 1] = float("inf")
    before = snapshot(layer)
    with merged(layer):
        pass
    assert_bit_identical(layer, before)


def test_merged_weight_is_rounded_once_from_the_exact_sum():
    """bf16: within half an ulp of the float64 sum, unlike a merge done in bf16 (PEFT)."""
    model = make_model("mlp", torch.bfloat16, std=0.1)
    for _, layer in iter_lora_layers(model):
        w = layer.base_layer.weight
        a64, b64 = layer.lora_A.weight.double(), layer.lora_B.weight.double()
        exact = w.double() + layer.scaling * (b64 @ a64)  # [out, in] float64 reference
        ours = merged_weight(layer).double()
        _, exp = torch.frexp(exact)
        half_ulp = torch.ldexp(torch.ones_like(exact), exp - 9)  # bf16 keeps 8 significant bits
        assert ((ours - exact).abs() <= half_ulp * (1 + 2**-12)).all()
        in_bf16 = (w + (layer.lora_B.weight @ layer.lora_A.weight) * layer.scaling).double()
        assert (ours - exact).abs().mean() < (in_bf16 - exact).abs().mean()


def test_merged_on_float32_adapters_over_bfloat16_base():
    model = make_model("mlp", torch.bfloat16)
    for _, layer in iter_lora_layers(model):
        layer.lora_A.float()
        layer.lora_B.float()
    before = snapshot(model)
    with merged(model):
        pass
    assert_bit_identical(model, before)


def test_merged_with_a_budget_refuses_to_hold_more_and_changes_nothing():
    model = make_model("llama", torch.bfloat16, std=1.0)  # delta far larger than W
    x = make_input("llama")
    before, out = snapshot(model), run(model, x)
    over = r"max_extra_fraction=0.5 .*Nothing was changed"
    with pytest.raises(MergeError, match=over), merged(model, max_extra_fraction=0.5):
        pytest.fail("the body must not run")
    assert_bit_identical(model, before)
    assert_unmerged(model)
    assert torch.equal(run(model, x), out)
    with merged(model, max_extra_fraction=2.0) as stats:  # allowed when asked for
        assert stats.extra_fraction > 0.5
    assert_bit_identical(model, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_never_refuses_by_default_small_model_large_rank(dtype):
    """A 128-wide Llama at r=8 after a few steps (large deltas): the default merges, each
    layer keeping the smaller of its patch and a plain copy, and restores bit for bit."""
    from support.models import make_tiny_llama

    from lora_runtime.adapters import apply_lora, mark_only_lora_trainable

    torch.manual_seed(0)
    model = make_tiny_llama(layers=1).to(dtype)
    apply_lora(model, 8, alpha=16)
    mark_only_lora_trainable(model)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in iter_lora_layers(model):  # as after training at a high learning rate
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_((torch.randn(p.shape, generator=gen) * 0.5).to(dtype))
    x = make_input("llama")
    before, out = snapshot(model), run(model, x)
    reference = merge_lora(copy.deepcopy(model))
    with merged(model) as stats:
        assert torch.equal(run(model, x), run(reference, x))
    held = [layer.base_layer.weight for _, layer in iter_lora_layers(model)]
    assert stats.extra_fraction > 0.5  # today's default budget would have refused
    assert stats.extra_bytes <= stats.merged_bytes + sum(
        (ly.lora_A.weight.numel() + ly.lora_B.weight.numel()) * ly.lora_A.weight.element_size()
        for _, ly in iter_lora_layers(model)
    )  # at most one copy of each weight, plus the adapter snapshots
    assert len(held) == stats.layers
    assert_bit_identical(model, before)
    assert_unmerged(model)
    assert torch.equal(run(model, x), out)


def test_merged_copy_store_undoes_a_base_weight_write_and_reports_it():
    model = make_model("llama", torch.float32, std=1.0)  # large deltas: plain copies
    before = snapshot(model)
    undone = r"base_layer.weight' \(undone: restored from its copy\)"
    with pytest.raises(MergeError, match=undone), merged(model), torch.no_grad():
        next(iter_lora_layers(model))[1].base_layer.weight.add_(1.0)
    assert_bit_identical(model, before)
    assert_unmerged(model)


@pytest.mark.parametrize("bad", [0, -1.0, "half", True])
def test_merged_rejects_bad_limits(bad):
    model = make_model("mlp")
    with pytest.raises(ValueError, match="max_extra_fraction"):
        merged(model, max_extra_fraction=bad).__enter__()
    assert_unmerged(model)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("merge", ["merged", "merge_lora"])
def test_non_finite_adapter_is_refused_and_model_unchanged(merge, value):
    model = make_model("llama", torch.bfloat16)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.lora_B.weight[3, 1] = value
    before = snapshot(model)
    named = r"'model\.layers\.0\.mlp\.up_proj\.lora_B\.weight' has 1 non-finite"
    with pytest.raises(ValueError, match=named):
        if merge == "merged":
            with merged(model):
                pytest.fail("the body must not run")
        else:
            merge_lora(model)
    assert_bit_identical(model, before)
    assert len(list(iter_lora_layers(model))) == 8  # 7 projections and lm_head, still patched
    assert_unmerged(model)


def test_nested_merged_is_refused_and_weights_unchanged():
    model = make_model("mlp", torch.bfloat16)
    before = snapshot(model)
    with merged(model):
        inside = snapshot(model)
        nested = "'0' is already merged.*nesting is not allowed"
        with pytest.raises(MergeError, match=nested), merged(model):
            pytest.fail("the body must not run")
        assert_bit_identical(model, inside)
        assert all(layer.merged for _, layer in iter_lora_layers(model))
    assert_bit_identical(model, before)


def test_remove_lora_and_merge_lora_inside_merged_are_refused():
    model = make_model("llama", torch.bfloat16)
    before = snapshot(model)
    with merged(model):
        inside = snapshot(model)
        with pytest.raises(RuntimeError, match="merged by merged"):
            remove_lora(model, merge=True)
        with pytest.raises(MergeError, match="already merged"):
            merge_lora(model)
        assert_bit_identical(model, inside)
    assert_bit_identical(model, before)


def test_merged_and_adapter_disabled_do_not_mix():
    model = make_model("mlp")
    before = snapshot(model)
    with adapter_disabled(model), pytest.raises(MergeError, match="adapter_disabled"):
        merged(model).__enter__()
    with merged(model), pytest.raises(MergeError, match="leave merged"), adapter_disabled(model):
        pytest.fail("the body must not run")
    assert_bit_identical(model, before)
    assert_unmerged(model)


@pytest.mark.parametrize("with_base", [False, True])
def test_optimizer_step_inside_merged_is_refused_and_restore_is_exact(with_base):
    model = make_model("llama", torch.bfloat16)
    params = list(model.parameters()) if with_base else [
        p for _, ly in iter_lora_layers(model) for p in (ly.lora_A.weight, ly.lora_B.weight)
    ]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)  # stale gradients: a step would change the weights
    before = snapshot(model)
    with merged(model):
        inside = snapshot(model)
        with pytest.raises(MergeError, match=r"AdamW.step\(\) inside merged.*nothing was changed"):
            optimizer.step()
        assert_bit_identical(model, inside)
    assert_bit_identical(model, before)
    optimizer.step()  # outside, the hook is gone
    assert not torch.equal(model.lm_head.lora_B.weight, before["lm_head.lora_B.weight"])


def test_an_optimizer_of_other_parameters_may_step_inside_merged():
    model, critic = make_model("mlp"), nn.Linear(4, 1)
    optimizer = torch.optim.SGD(critic.parameters(), lr=0.1)
    critic(torch.ones(2, 4)).sum().backward()
    before = snapshot(model)
    with merged(model):
        optimizer.step()
    assert_bit_identical(model, before)


def test_in_place_adapter_write_inside_merged_is_undone_and_reported():
    model = make_model("mlp", torch.bfloat16)
    before = snapshot(model)
    undone = r"'2' adapters \(restored to their values at entry\)"
    with pytest.raises(MergeError, match=undone), merged(model), torch.no_grad():
        model[2].lora_B.weight.mul_(3.0)
    assert_bit_identical(model, before)
    assert_unmerged(model)


def test_merged_under_inference_mode_for_rollouts():
    model = make_model("llama", torch.bfloat16)
    x = make_input("llama")
    before, expected = snapshot(model), run(merge_lora(copy.deepcopy(model)), x)
    with torch.inference_mode(), merged(model):
        assert torch.equal(model(x).logits, expected)
    assert_bit_identical(model, before)
    model.train()
    model(x).logits.float().square().mean().backward()  # still trainable afterwards
    assert model.lm_head.lora_B.weight.grad is not None


def test_exception_inside_merged_still_restores():
    model = make_model("llama", torch.bfloat16)
    before = snapshot(model)
    with pytest.raises(KeyError), merged(model):
        raise KeyError("rollout failed")
    assert_bit_identical(model, before)
    assert_unmerged(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama", "mlp"])
def test_merge_lora_returns_plain_linears_with_merged_weights(kind, dtype):
    model = make_model(kind, dtype)
    x = make_input(kind, dtype)
    lora_out = run(model, x)
    expected = {path: merged_weight(layer) for path, layer in iter_lora_layers(model)}
    paths_bias = {path: layer.base_layer.bias for path, layer in iter_lora_layers(model)}
    assert merge_lora(model) is model
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    for path, weight in expected.items():
        module = model.get_submodule(path)
        assert type(module) is nn.Linear
        assert torch.equal(module.weight, weight)
        assert module.bias is paths_bias[path]
    assert not any("lora_" in k or "base_layer" in k for k in model.state_dict())
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    error = (run(model, x).float() - lora_out.float()).abs().max()
    assert error <= tol * lora_out.float().abs().max()


def test_merge_lora_float32_matches_float64_reference():
    model = make_model("mlp", torch.float32)
    reference = copy.deepcopy(model).double()
    x = make_input("mlp")
    expected = run(reference, x.double())  # LoRA path in float64
    merge_lora(model)
    assert ((run(model, x).double() - expected).abs().max() / expected.abs().max()) < 1e-6


def test_tied_base_weight_is_untied_by_merge_and_tied_again_by_merged():
    embed, head = nn.Embedding(16, 8), nn.Linear(8, 16, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "lm_head": head})
    apply_lora(model, 2, target_modules=["lm_head"])
    nn.init.normal_(model.lm_head.lora_B.weight, std=0.02)
    shared, before = embed.weight, embed.weight.detach().clone()
    x = torch.randn(3, 8, dtype=torch.float64)
    layer = model.lm_head
    expected = x @ (before.double() + layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()).T
    with merged(model):
        assert layer.base_layer.weight is not shared and torch.equal(shared, before)
        assert (layer(x.float()).double() - expected).abs().max() < 1e-5
    assert layer.base_layer.weight is shared and torch.equal(shared, before)
    merge_lora(model)
    assert model.lm_head.weight is not embed.weight and torch.equal(embed.weight, before)
    assert (model.lm_head(x.float()).double() - expected).abs().max() < 1e-5


def test_merge_lora_without_adapters_is_refused():
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(nn.Sequential(nn.Linear(4, 4)))


# ------------------------------------------------ exact messages and accounting, small models


def small(dtype: torch.dtype = torch.float32, std: float = 0.05, n: int = 2) -> nn.Module:
    """`n` LoRALinear(8, 8), r 2, alpha 3 (scaling 1.5), random non-zero adapters."""
    torch.manual_seed(0)
    model = nn.Sequential(*[LoRALinear(nn.Linear(8, 8, bias=False), 2, lora_alpha=3) for _ in range(n)])
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in model:
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.to(dtype)


def test_refusals_before_merging_have_exact_messages_and_change_nothing():
    with pytest.raises(ValueError) as err:
        merge_lora(nn.Sequential(nn.Linear(2, 2)))
    assert str(err.value) == "merge_lora: the model has no LoRA layers (apply_lora first)"
    with pytest.raises(ValueError) as err, merged(nn.Linear(2, 2)):
        pass
    assert str(err.value) == "merged: the model has no LoRA layers (apply_lora first)"
    model = small()
    before = snapshot(model)
    with torch.no_grad():
        model[1].lora_A.weight[0, 0] = float("inf")
        model[1].lora_A.weight[1, 3] = float("nan")
    with pytest.raises(ValueError) as err:
        merge_lora(model)
    assert str(err.value) == (
        "merge_lora: adapter '1.lora_A.weight' has 2 non-finite (NaN or inf) values; "
        "merging needs finite adapters. Nothing was changed"
    )
    with torch.no_grad():
        model[1].lora_A.weight.copy_(before["1.lora_A.weight"])
        model[0].lora_B.weight[7, 1] = float("-inf")
    with pytest.raises(ValueError) as err, merged(model):
        pass
    assert str(err.value) == (
        "merged: adapter '0.lora_B.weight' has 1 non-finite (NaN or inf) values; "
        "merging needs finite adapters. Nothing was changed"
    )
    with torch.no_grad():
        model[0].lora_B.weight.copy_(before["0.lora_B.weight"])
    assert_bit_identical(model, before)
    assert_unmerged(model)
    with merged(model):
        with pytest.raises(MergeError) as err, merged(model):
            pass
        assert str(err.value) == (
            "merged: layer '0' is already merged by merged(...); nesting is not allowed, "
            "leave the outer context first"
        )
    with adapter_disabled(model), pytest.raises(MergeError) as err:
        merge_lora(model)
    assert str(err.value) == (
        "merge_lora: layer '0' has its adapter disabled by adapter_disabled(...); leave that context first"
    )
    assert_bit_identical(model, before)
    assert_unmerged(model)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, "half", True, False])
def test_bad_limits_are_named_with_what_is_allowed(bad):
    model = small()
    with pytest.raises(ValueError) as err, merged(model, max_extra_fraction=bad):
        pass
    assert str(err.value) == f"merged: max_extra_fraction={bad!r}; allowed: None or a number > 0"
    assert_unmerged(model)


@pytest.mark.parametrize("limit", [1, 10.0, None])
def test_ints_floats_and_none_are_accepted_limits(limit):
    model = small()
    before = snapshot(model)
    with merged(model, max_extra_fraction=limit) as stats:
        assert all(layer.merged for layer in model)
    assert stats.layers == 2 and stats.extra_fraction < 1
    assert_bit_identical(model, before)


def test_the_budget_is_checked_with_ge_after_each_layer_and_the_message_gives_the_bytes():
    # bf16, large deltas: each layer keeps a plain copy (128 bytes) and its adapters
    # (2 * 16 values * 2 bytes = 64): 192 extra bytes per layer; 256 merged bytes in all
    model = small(torch.bfloat16, std=4.0, n=2)
    before = snapshot(model)
    for limit, after in ((0.75, 1), (1.5, 2)):  # 192 >= 0.75 * 256 after one layer; 384 >= 1.5 * 256
        with pytest.raises(MergeError) as err, merged(model, max_extra_fraction=limit):
            pytest.fail("the body must not run")
        assert str(err.value) == (
            f"merged: restoring the base weights exactly would hold more than max_extra_fraction={limit} "
            f"of the merged weights ({192 * after} bytes after {after} of 2 layers, merged weights 256 "
            "bytes): the adapters' deltas are large next to the weights. Nothing was changed; raise "
            "max_extra_fraction, or use iter_merged_weights / merge_lora on a copy"
        )
        assert_bit_identical(model, before)
        assert_unmerged(model)
    with merged(model, max_extra_fraction=1.5000001) as stats:
        pass
    assert (stats.layers, stats.merged_bytes, stats.extra_bytes, stats.total_elements) == (2, 256, 384, 128)
    assert (stats.patched_elements, stats.untied_bytes) == (0, 0)
    assert stats.extra_fraction == 1.5
    assert_bit_identical(model, before)


def test_empty_stats_report_a_zero_fraction():
    stats = MergeStats()
    assert (stats.layers, stats.merged_bytes, stats.extra_bytes, stats.patched_elements,
            stats.total_elements, stats.untied_bytes, stats.extra_fraction) == (0, 0, 0, 0, 0, 0, 0.0)


def test_a_step_inside_merged_names_the_optimizer_and_the_layer_and_the_hook_goes_on_exit():
    model = small()
    optimizer = torch.optim.SGD([model[1].lora_B.weight], lr=0.5)
    model[1].lora_B.weight.grad = torch.ones_like(model[1].lora_B.weight)
    before = snapshot(model)
    with merged(model):
        with pytest.raises(MergeError) as err:
            optimizer.step()
        assert str(err.value) == (
            "merged: SGD.step() inside merged(...) would update layer '1' (adapter or merged base "
            "weight); nothing was changed. merged() is for inference: step the optimizer outside it"
        )
    assert_bit_identical(model, before)
    with pytest.raises(RuntimeError), merged(model):
        raise RuntimeError("inside")
    optimizer.step()  # the hook is gone after a normal and after a failed block
    assert torch.equal(model[1].lora_B.weight, before["1.lora_B.weight"] - 0.5)


def test_merged_weight_and_merge_lora_match_a_float64_reference_in_each_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        model = small(dtype, std=0.3)
        refs = [
            layer.base_layer.weight.double() + 1.5 * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
            for layer in model
        ]
        acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        tols = [  # half an ulp of the result, plus the rounding of the sum's terms
            torch.finfo(dtype).eps * ref.abs() + 4 * acc_eps * (
                layer.base_layer.weight.double().abs()
                + 1.5 * layer.lora_B.weight.double().abs() @ layer.lora_A.weight.double().abs())
            for layer, ref in zip(model, refs)
        ]
        for layer, ref, tol in zip(model, refs, tols):
            got = merged_weight(layer)
            assert got.dtype == dtype and got.shape == (8, 8)
            assert ((got.double() - ref).abs() <= tol).all()
            assert (ref - layer.base_layer.weight.double()).abs().max() > 10 * tol.max()  # the delta is seen
        assert merge_lora(model) is model
        for module, ref, tol in zip(model, refs, tols):
            assert type(module) is nn.Linear
            assert ((module.weight.double() - ref).abs() <= tol).all()
