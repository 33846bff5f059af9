"""LoRALinear: initialisation, scaling, dropout, flags, validation."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from support.numerics import TOL, rel_err
from torch import nn

from lora_runtime.adapters import LoRALinear
from lora_runtime.ops.reference import lora_linear_reference


def make_layer(d_in=64, d_out=48, r=8, **kw):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(d_in, d_out), r, **kw)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    return layer


def test_gaussian_init_stats_and_zero_b():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(512, 512), 16)
    std = layer.lora_A.weight.std().item()
    assert abs(std - 1 / 16) < 0.1 / 16
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    x = torch.randn(4, 512)
    assert torch.equal(layer(x), layer.base_layer(x))  # a new adapter changes nothing


def test_kaiming_init_bound():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(300, 20), 4, init="kaiming")
    bound = 1 / math.sqrt(300)  # kaiming_uniform with a=sqrt(5)
    assert layer.lora_A.weight.abs().max() <= bound + 1e-7
    assert layer.lora_A.weight.abs().max() > 0.8 * bound
    assert torch.count_nonzero(layer.lora_B.weight) == 0


@pytest.mark.parametrize("alpha,rslora,expected", [(None, False, 1.0), (16, False, 2.0), (16, True, 16 / math.sqrt(8))])
def test_scaling(alpha, rslora, expected):
    layer = make_layer(r=8, lora_alpha=alpha, use_rslora=rslora)
    assert layer.scaling == pytest.approx(expected)
    x = torch.randn(3, 64, dtype=torch.float64)
    w = layer.base_layer
    ref = lora_linear_reference(
        x, w.weight.double(), w.bias.double(), layer.lora_A.weight.double(), layer.lora_B.weight.double(), expected
    )
    got = layer(x.float()).double()
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_state_dict_keys_and_base_is_not_copied():
    base = nn.Linear(8, 6)
    layer = LoRALinear(base, 2)
    assert set(layer.state_dict()) == {"base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight"}
    assert layer.base_layer is base
    assert layer.lora_A.weight.shape == (2, 8) and layer.lora_B.weight.shape == (6, 2)


def test_disable_and_merged_flags_give_base_output():
    layer = make_layer()
    x = torch.randn(5, 64)
    assert not torch.allclose(layer(x), layer.base_layer(x))
    layer.disable_adapters = True
    assert torch.equal(layer(x), layer.base_layer(x))


def _relative_error_to_dropout_reference(layer: LoRALinear, x: torch.Tensor, y: torch.Tensor, seed: int) -> float:
    """Max relative error of `y` to the float64 forward with the dropout mask that `seed` draws."""
    torch.manual_seed(seed)
    dropped = torch.nn.functional.dropout(x, layer.lora_dropout, training=True)  # the same mask
    w = layer.base_layer
    ref = lora_linear_reference(
        x.double(), w.weight.double(), w.bias.double(), layer.lora_A.weight.double(),
        layer.lora_B.weight.double(), layer.scaling, dropped.double(),
    )
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def test_dropout_applies_to_lora_branch_only():
    layer = make_layer(lora_dropout=0.5)
    x = torch.randn(200, 64)
    layer.eval()
    y_eval = layer(x)
    layer.train()
    torch.manual_seed(5)
    y_train = layer(x)
    assert not torch.allclose(y_train, y_eval)
    assert _relative_error_to_dropout_reference(layer, x, y_train, seed=5) < 1e-5


def test_dropout_backward_matches_reference():
    layer = make_layer(lora_dropout=0.3).train()
    x = torch.randn(10, 64, requires_grad=True)
    torch.manual_seed(7)
    layer(x).square().sum().backward()
    grads = (x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone())
    x2 = x.detach().double().requires_grad_(True)
    a = layer.lora_A.weight.detach().double().requires_grad_(True)
    b = layer.lora_B.weight.detach().double().requires_grad_(True)
    torch.manual_seed(7)
    dropped = torch.nn.functional.dropout(x2, 0.3, training=True)
    w = layer.base_layer
    lora_linear_reference(x2, w.weight.double(), w.bias.double(), a, b, layer.scaling, dropped).square().sum().backward()
    for g, ref in zip(grads, (x2.grad, a.grad, b.grad)):
        assert ((g.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_float32_adapters_on_bfloat16_base():
    layer = make_layer()
    layer.base_layer.to(torch.bfloat16)
    y = layer(torch.randn(3, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"r": 0}, r"r=0 does not fit Linear\(64, 48\): allowed 1 <= r <= min\(in, out\) = 48"),
        ({"r": 49}, r"r=49 does not fit"),
        ({"r": 4, "lora_dropout": 1.0}, r"lora_dropout=1.0: allowed 0 <= p < 1"),
        ({"r": 4, "init": "xavier"}, r"init='xavier': allowed \['gaussian', 'kaiming'\]"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(64, 48), **kw)


def _reference(layer: LoRALinear, x: torch.Tensor, adapter_dtype: torch.dtype, scaling: float) -> torch.Tensor:
    """float64 `x W^T + b + s (x A^T) B^T`, with A and B first rounded to `adapter_dtype`."""
    w, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    a = layer.lora_A.weight.detach().to(adapter_dtype).double()  # [r, in]
    bb = layer.lora_B.weight.detach().to(adapter_dtype).double()  # [out, r]
    return x.double() @ w.T + b + scaling * (x.double() @ a.T) @ bb.T  # [n, out]


@pytest.mark.parametrize("grad", [True, False])  # the autograd op, and the no-grad inference kernel
def test_float32_adapters_on_bfloat16_base_match_float64_reference(grad):
    layer = make_layer(lora_alpha=24)  # scaling 3
    nn.init.normal_(layer.lora_B.weight, std=0.5)
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(6, 64).to(torch.bfloat16)
    with torch.set_grad_enabled(grad):
        y = layer(x)  # [6, 48]
    assert y.dtype == torch.bfloat16 and y.requires_grad == grad
    ref = _reference(layer, x, torch.bfloat16, 3.0)
    base_only = _reference(layer, x, torch.bfloat16, 0.0)
    err = rel_err(y, ref)
    assert err < TOL[torch.bfloat16]
    assert rel_err(base_only, ref) > 10 * err  # the LoRA term is seen


def test_no_grad_path_equals_the_autograd_path_float64():
    layer = make_layer(lora_alpha=24).double()
    x = torch.randn(2, 7, 64, dtype=torch.float64)
    with torch.no_grad():
        fast = layer(x)
    slow = layer(x)
    ref = _reference(layer, x.reshape(-1, 64), torch.float64, 3.0).reshape(2, 7, 48)
    assert torch.allclose(fast, ref, rtol=1e-12, atol=1e-12) and torch.allclose(slow, ref, rtol=1e-12, atol=1e-12)
    wrong = _reference(layer, x.reshape(-1, 64), torch.float64, 3.03).reshape(2, 7, 48)
    assert not torch.allclose(fast, wrong, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("r", [1, 48])
def test_rank_limits_are_inclusive(r):
    layer = LoRALinear(nn.Linear(64, 48), r)
    assert layer.r == r and layer.lora_A.weight.shape == (r, 64) and layer.lora_B.weight.shape == (48, r)


@pytest.mark.parametrize("kw, match", [
    ({"r": True}, r"^LoRALinear: rank r=True does not fit Linear\(64, 48\): allowed 1 <= r <= min\(in, out\) = 48$"),
    ({"r": 4.0}, r"^LoRALinear: rank r=4.0 does not fit Linear\(64, 48\)"),
    ({"r": 4, "lora_dropout": -0.1}, r"^lora_dropout=-0.1: allowed 0 <= p < 1$"),
    ({"r": 4, "init": "xavier"}, r"^init='xavier': allowed \['gaussian', 'kaiming'\]$"),
])
def test_bad_arguments_full_message(kw, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(64, 48), **kw)


def test_attributes_repr_and_delta_weight_float64():
    layer = make_layer(r=4, lora_alpha=None, lora_dropout=0.25, init="kaiming")
    assert (layer.in_features, layer.out_features, layer.r, layer.lora_alpha, layer.scaling) == (64, 48, 4, 4.0, 1.0)
    assert (layer.lora_dropout, layer.use_rslora, layer.init, layer.disable_adapters, layer.merged) == (
        0.25, False, "kaiming", False, False)
    assert layer.extra_repr() == "r=4, lora_alpha=4, scaling=1, lora_dropout=0.25, use_rslora=False"
    rs = make_layer(r=4, lora_alpha=6, use_rslora=True)
    assert rs.scaling == 3.0 and rs.extra_repr() == "r=4, lora_alpha=6, scaling=3, lora_dropout=0, use_rslora=True"
    delta = rs.get_delta_weight()  # [48, 64]
    assert delta.dtype == torch.float32 and delta.shape == (48, 64)
    ref = 3.0 * rs.lora_B.weight.double() @ rs.lora_A.weight.double()
    assert torch.allclose(delta.double(), ref, rtol=1e-6, atol=1e-7) and delta.abs().max() > 0
    rs.double()
    assert rs.get_delta_weight().dtype == torch.float64
    rs.to(torch.bfloat16)
    assert rs.get_delta_weight().dtype == torch.float32


def test_reset_draws_from_the_generator_and_refuses_unknown_init():
    layer = make_layer(r=8)
    layer.reset_lora_parameters("gaussian", generator=torch.Generator().manual_seed(5))
    a = layer.lora_A.weight.detach().clone()
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    layer.reset_lora_parameters("gaussian", generator=torch.Generator().manual_seed(5))
    assert torch.equal(layer.lora_A.weight, a)
    expected = torch.empty(8, 64)
    nn.init.normal_(expected, 0.0, 1.0 / 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, expected)
    layer.reset_lora_parameters("kaiming", generator=torch.Generator().manual_seed(5))
    expected = torch.empty(8, 64)
    nn.init.kaiming_uniform_(expected, a=math.sqrt(5), generator=torch.Generator().manual_seed(5))
    assert torch.equal(layer.lora_A.weight, expected)
    with pytest.raises(ValueError, match=r"^init='orthogonal': allowed \['gaussian', 'kaiming'\]$"):
        layer.reset_lora_parameters("orthogonal")
    assert torch.equal(layer.lora_A.weight, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_adapters_take_the_base_layers_dtype_and_device(dtype):
    base = nn.Linear(8, 6).to(dtype)
    layer = LoRALinear(base, 2, lora_alpha=4)
    for p in (layer.lora_A.weight, layer.lora_B.weight):
        assert p.dtype == dtype and p.device == base.weight.device
    nn.init.normal_(layer.lora_B.weight, std=0.5)
    if dtype == torch.float64:  # all float64: the output equals the float64 formula to rounding
        x = torch.randn(3, 8, dtype=torch.float64)
        ref = _reference(layer, x, torch.float64, 2.0)
        assert torch.allclose(layer(x), ref, rtol=1e-12, atol=1e-12)


class _Doubled(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def test_a_parametrized_base_weight_takes_the_attribute_path_with_and_without_grad():
    from torch.nn.utils import parametrize

    layer = make_layer(d_in=8, d_out=6, r=2, lora_alpha=6).double()  # scaling 3
    w0 = layer.base_layer.weight.detach().clone()
    parametrize.register_parametrization(layer.base_layer, "weight", _Doubled())
    assert "weight" not in layer.base_layer._parameters  # no plain parameter: the fallback
    x = torch.randn(4, 8, dtype=torch.float64)
    b, a = layer.lora_B.weight.detach(), layer.lora_A.weight.detach()
    ref = x @ (2 * w0).T + layer.base_layer.bias.detach() + 3.0 * (x @ a.T) @ b.T  # float64
    with torch.no_grad():
        fast = layer(x)
    assert torch.allclose(fast, ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(layer(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_backward_without_dropout_matches_float64_reference(mode):
    """p = 0 with grad enabled takes the autograd op (the no-grad kernel has no gradient)."""
    layer = make_layer(d_in=16, d_out=12, r=4, lora_alpha=12)  # scaling 3
    layer.train(mode == "train")
    x = torch.randn(5, 16, requires_grad=True)
    with warnings.catch_warnings():  # backprop through the no-grad kernel only warns (deprecated)
        warnings.simplefilter("error")
        (layer(x) * torch.linspace(-1, 1, 12)).sum().backward()
    got = (x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad)
    x64 = x.detach().double().requires_grad_(True)
    a = layer.lora_A.weight.detach().double().requires_grad_(True)
    b = layer.lora_B.weight.detach().double().requires_grad_(True)
    w = layer.base_layer
    y = x64 @ w.weight.double().T + w.bias.double() + 3.0 * (x64 @ a.T) @ b.T  # [5, 12]
    (y * torch.linspace(-1, 1, 12, dtype=torch.float64)).sum().backward()
    for g, ref in zip(got, (x64.grad, a.grad, b.grad)):
        assert g is not None and torch.allclose(g.double(), ref, rtol=1e-5, atol=1e-6)


def test_dropout_in_training_applies_under_no_grad_too():
    layer = make_layer(lora_dropout=0.5).train()
    x = torch.randn(50, 64)
    with torch.no_grad():
        torch.manual_seed(3)
        y = layer(x)
    assert _relative_error_to_dropout_reference(layer, x, y, seed=3) < 1e-5
    layer.eval()
    with torch.no_grad():
        assert not torch.allclose(layer(x), y)  # eval: no dropout


class _Siblings(nn.Module):
    """Three LoRA layers reading the same input (as q / k / v do)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (LoRALinear(nn.Linear(8, n), 2, lora_alpha=6) for n in (6, 4, 5))
        for layer in (self.q, self.k, self.v):
            nn.init.normal_(layer.lora_B.weight, std=0.5)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


@pytest.mark.parametrize("grad", [False, True])
def test_grouped_siblings_give_each_layer_its_own_float64_result(grad):
    from lora_runtime.adapters.grouping import group_siblings

    model = _Siblings().double()
    x = torch.randn(3, 8, dtype=torch.float64)
    assert group_siblings(model, x) == [["q", "k", "v"]]
    assert [layer._slot for layer in (model.q, model.k, model.v)] == [0, 1, 2]
    with torch.set_grad_enabled(grad):
        out = model(x)  # [3, 15]
    refs = [_reference(layer, x, torch.float64, 3.0) for layer in (model.q, model.k, model.v)]
    assert torch.allclose(out, torch.cat(refs, dim=-1), rtol=1e-12, atol=1e-12)
    y = model.k(x + 1)  # another input than the leader's: the member computes alone
    assert torch.allclose(y, _reference(model.k, x + 1, torch.float64, 3.0), rtol=1e-12, atol=1e-12)
