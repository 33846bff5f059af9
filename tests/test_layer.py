"""LoRALinear: initialisation, scaling, dropout, flags, validation."""

from __future__ import annotations

import math

import pytest
import torch
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


def test_dropout_applies_to_lora_branch_only():
    layer = make_layer(lora_dropout=0.5)
    x = torch.randn(200, 64)
    layer.eval()
    y_eval = layer(x)
    layer.train()
    torch.manual_seed(5)
    y_train = layer(x)
    assert not torch.allclose(y_train, y_eval)
    # Reproduce the training forward with the same dropout mask, in float64.
    torch.manual_seed(5)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)
    w = layer.base_layer
    ref = lora_linear_reference(
        x.double(), w.weight.double(), w.bias.double(), layer.lora_A.weight.double(),
        layer.lora_B.weight.double(), layer.scaling, dropped.double(),
    )
    assert ((y_train.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


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
