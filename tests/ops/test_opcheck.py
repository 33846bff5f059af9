"""`torch.library.opcheck` over every op of the library (schema, autograd registration, fake
kernel, AOT dispatch), one table. Correctness against float64 references lives in the ops'
own tests (test_ops.py, test_grouping.py, test_merge_exact.py)."""

from __future__ import annotations

import pytest
import torch

from lora_runtime.ops._extension import REQUIRED_OPS, extension_loaded

pytestmark = pytest.mark.skipif(not extension_loaded(), reason="needs the compiled extension")


def _rnd(*shape, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed + 7 * len(shape) + sum(shape))
    return torch.randn(*shape, generator=g) * std


def _linear(lead=(3, 4), d_in=16, d_out=12, r=4):
    """x, weight, bias, lora_a, lora_b with a non-zero lora_b."""
    return (_rnd(*lead, d_in), _rnd(d_out, d_in, std=0.25), _rnd(d_out), _rnd(r, d_in, std=0.25),
            _rnd(d_out, r, std=0.5))


def _group(lead=(3, 4), d_in=16, outs=(12, 8), ranks=(4, 2)):
    """x, weights, biases (member 1 without), stacked lora_a, lora_bs (non-zero)."""
    x = _rnd(*lead, d_in)
    weights = [_rnd(o, d_in, std=0.25, seed=i) for i, o in enumerate(outs)]
    biases = [_rnd(o) if i != 1 else None for i, o in enumerate(outs)]
    lora_bs = [_rnd(o, r, std=0.5, seed=i) for i, (o, r) in enumerate(zip(outs, ranks))]
    return x, weights, biases, _rnd(sum(ranks), d_in, std=0.25), lora_bs


def _merge_leave_args():
    """merge_leave's arguments: a weight merged by merge_enter and its patch store."""
    weight, lora_b, lora_a = _rnd(9, 13), _rnd(9, 3, std=1e-1), _rnd(3, 13, std=1e-1)
    mask, values, _, _ = torch.ops.lora_runtime.merge_enter(weight, lora_b, lora_a, 0.5)
    return weight, lora_b, lora_a, 0.5, mask, values


def _needs_grad(*tensors):
    return [t.requires_grad_() for t in tensors]


def _on_linear(make):
    """A case builder: `make(x, weight, bias, lora_a, lora_b)` on fresh linear inputs."""
    return lambda: make(*_linear())


def _on_group(make):
    """A case builder: `make(x, weights, biases, lora_a, lora_bs)` on fresh group inputs."""
    return lambda: make(*_group())


LORA = [True, False, False, True, True, False]  # lora_linear_bwd's mask: dx, dA, dB
# Each entry builds fresh arguments (some need gradients; the merge ops write their weight).
CASES = {
    "lora_linear": _on_linear(lambda x, w, b, a, lb: (x, w, b, *_needs_grad(a, lb), 0.5)),
    "lora_linear_fwd/lora": _on_linear(lambda x, w, b, a, lb: (x, w, b, *_needs_grad(a, lb), 0.5)),
    "lora_linear_fwd/x_no_bias": _on_linear(lambda x, w, b, a, lb: (*_needs_grad(x), w, None, a, lb, 2.0)),
    "lora_linear_fwd/lora_input": _on_linear(
        lambda x, w, b, a, lb: (x, w, b, a, lb, 0.5, *_needs_grad(torch.randn_like(x)))
    ),
    "lora_linear_bwd/lora": _on_linear(
        lambda x, w, b, a, lb: (_rnd(3, 4, 12), x, w, a, lb, _rnd(3, 4, 4), 0.5, None, LORA)
    ),
    "lora_linear_bwd/all": _on_linear(
        lambda x, w, b, a, lb: (_rnd(3, 4, 12), x, w, a, lb, _rnd(3, 4, 4), 0.5, None, [True] * 5 + [False])
    ),
    "lora_linear_infer/bias": _on_linear(lambda *t: (*t, 0.5)),
    "lora_linear_infer/no_bias": _on_linear(lambda x, w, b, a, lb: (x, w, None, a, lb, 2.0)),
    "lora_group_fwd": _on_group(
        lambda x, ws, bs, a, lbs: (*_needs_grad(x), ws, bs, *_needs_grad(a), lbs, [1.5, 0.5])
    ),
    "lora_group_bwd": _on_group(  # member 1's output got no gradient (None)
        lambda x, ws, bs, a, lbs: (
            [_rnd(3, 4, 12), None], x, ws, a, lbs, _rnd(3, 4, 6), [1.5, 0.5], True, True, True
        )
    ),
    "lora_group_infer": _on_group(lambda *t: (*t, [1.5, 0.5])),
    "merge_enter/patch": lambda: (_rnd(9, 13), _rnd(9, 3, std=1e-1), _rnd(3, 13, std=1e-1), 0.5),
    "merge_enter/copy": lambda: (_rnd(9, 13), _rnd(9, 3, std=1e2), _rnd(3, 13, std=1e1), 0.5),  # most elements miss
    "merge_leave": _merge_leave_args,
    "lora_product": lambda: (_rnd(9, 3), _rnd(3, 13)),
}


def test_the_table_covers_every_op():
    assert {name.split("/")[0] for name in CASES} == set(REQUIRED_OPS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_opcheck(case):
    args = CASES[case]()
    op = getattr(torch.ops.lora_runtime, case.split("/")[0]).default
    torch.library.opcheck(op, args)
