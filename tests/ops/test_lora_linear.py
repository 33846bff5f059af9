"""The fused op against a float64 reference: outputs, gradients, compile, errors (opcheck:
test_opcheck.py)."""

from __future__ import annotations

import pytest
import torch
from support.numerics import TOL, rel_err

import lora_runtime
from lora_runtime.ops import lora_linear
from lora_runtime.ops.reference import lora_linear_reference

pytestmark = pytest.mark.skipif(
    not lora_runtime.extension_loaded(), reason="needs the compiled extension"
)

def sample_inputs(lead=(3, 5), d_in=48, d_out=40, r=8, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    x = rnd(*lead, d_in)
    w = rnd(d_out, d_in, std=d_in**-0.5)
    b = rnd(d_out) if bias else None
    a = rnd(r, d_in, std=d_in**-0.5)
    bb = rnd(d_out, r, std=0.5)  # non-zero B: the LoRA path matters
    return x, w, b, a, bb


def run(fn, inputs, scaling, lora_input=None):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    li = lora_input.detach().clone().requires_grad_(True) if lora_input is not None else None
    y = fn(*leaves, scaling, li)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    y.backward(grad_out.to(y.dtype))
    grads = [t.grad for t in leaves if t is not None] + ([li.grad] if li is not None else [])
    return y, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "lead,d_in,d_out,r", [((7,), 32, 24, 4), ((2, 3, 5), 64, 96, 16), ((1,), 16, 16, 16), ((0, 4), 8, 8, 2)]
)
def test_forward_backward_match_float64_reference(dtype, bias, lead, d_in, d_out, r):
    inputs = sample_inputs(lead, d_in, d_out, r, dtype, bias)
    scaling = 1.7
    y, grads = run(lora_linear, inputs, scaling)
    ref_inputs = [t.double() if t is not None else None for t in inputs]
    y_ref, grads_ref = run(lora_linear_reference, ref_inputs, scaling)
    assert y.dtype == dtype and y.shape == (*lead, d_out)
    if y.numel() == 0:
        return
    assert rel_err(y, y_ref) < TOL[dtype]
    assert len(grads) == len(grads_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == dtype and g.shape == g_ref.shape
        assert rel_err(g, g_ref) < TOL[dtype]


def test_random_shapes_float32():
    gen = torch.Generator().manual_seed(123)
    for trial in range(10):
        lead = tuple(int(s) for s in torch.randint(1, 6, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen))
        d_in, d_out = (int(v) for v in torch.randint(2, 80, (2,), generator=gen))
        r = int(torch.randint(1, min(d_in, d_out) + 1, (1,), generator=gen))
        inputs = sample_inputs(lead, d_in, d_out, r, torch.float32, trial % 2 == 0, seed=trial)
        y, grads = run(lora_linear, inputs, 0.5 + trial)
        y_ref, grads_ref = run(lora_linear_reference, [t.double() if t is not None else None for t in inputs], 0.5 + trial)
        assert rel_err(y, y_ref) < 1e-5
        for g, g_ref in zip(grads, grads_ref):
            assert rel_err(g, g_ref) < 1e-5


def test_non_contiguous_input():
    x, w, b, a, bb = sample_inputs((6, 4), 32, 16, 4)
    xt = x.transpose(0, 1)  # [4, 6, 32], non-contiguous
    assert not xt.is_contiguous()
    y, grads = run(lora_linear, (xt, w, b, a, bb), 0.5)
    y_ref, grads_ref = run(lora_linear_reference, [t.double() for t in (xt, w, b, a, bb)], 0.5)
    assert rel_err(y, y_ref) < 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-5


def test_separate_lora_input_gradients():
    """Dropout form: the LoRA branch reads lora_input; gradients flow to both inputs."""
    inputs = sample_inputs((4, 3), 24, 20, 4)
    lora_input = torch.randn(4, 3, 24) * 2
    y, grads = run(lora_linear, inputs, 0.8, lora_input)
    y_ref, grads_ref = run(
        lora_linear_reference, [t.double() for t in inputs], 0.8, lora_input.double()
    )
    assert rel_err(y, y_ref) < 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-5


def test_gradcheck_float64():
    x, w, b, a, bb = (t.requires_grad_(True) for t in sample_inputs((2, 3), 6, 5, 2, torch.float64))
    assert torch.autograd.gradcheck(lambda *t: lora_linear(*t, 0.7), (x, w, b, a, bb))
    li = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b, a, bb, li: lora_linear(x, w, b, a, bb, 0.7, li), (x, w, b, a, bb, li)
    )
    assert torch.autograd.gradcheck(lambda x, a, bb: lora_linear(x, w.detach(), None, a, bb, 2.0), (x, a, bb))


def test_only_required_gradients_and_thin_saved_tensors():
    """Frozen base: no weight/bias gradients; saved activations are x and h = x @ A.T only."""
    x, w, b, a, bb = sample_inputs((5, 7), 32, 48, 4)
    x.requires_grad_(True)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear(x, w, b, a, bb, 0.5)
    activations = sorted(s for s in saved if s[:2] == (5, 7))
    assert activations == [(5, 7, 4), (5, 7, 32)]  # h [N, r] and x [N, in]; no [N, out]
    y.sum().backward()
    assert w.grad is None and b.grad is None
    assert x.grad is not None and a.grad is not None and bb.grad is not None


def test_compile_fullgraph_matches_eager():
    x, w, b, a, bb = sample_inputs((2, 6), 32, 24, 4)
    compiled = torch.compile(
        lambda x, a, bb: lora_linear(x, w, b, a, bb, 0.5), fullgraph=True, backend="aot_eager"
    )
    leaves = [t.clone().requires_grad_(True) for t in (x, a, bb)]
    y = compiled(*leaves)
    y.square().sum().backward()
    ref_leaves = [t.double().requires_grad_(True) for t in (x, a, bb)]
    y_ref = lora_linear_reference(ref_leaves[0], w.double(), b.double(), ref_leaves[1], ref_leaves[2], 0.5)
    y_ref.square().sum().backward()
    assert rel_err(y, y_ref) < 1e-5
    for leaf, ref in zip(leaves, ref_leaves):
        assert rel_err(leaf.grad, ref.grad) < 1e-5


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda t: {**t, "x": torch.randn(3, 17)}, r"x has 17 input features .*weight expects 16"),
        (lambda t: {**t, "lora_a": torch.randn(4, 15)}, r"lora_a must be \[r, in\] = \[r, 16\], got lora_a.shape=\[4, 15\]"),
        (lambda t: {**t, "lora_b": torch.randn(12, 3)}, r"lora_b must be \[out, r\] = \[12, 4\], got lora_b.shape=\[12, 3\]"),
        (lambda t: {**t, "bias": torch.randn(11)}, r"bias must be \[out\] = \[12\], got bias.shape=\[11\]"),
        (lambda t: {**t, "weight": torch.randn(12, 16, dtype=torch.float64)}, r"weight has dtype Double but x has dtype Float"),
        (lambda t: {**t, "lora_input": torch.randn(3, 8)}, r"lora_input must have x's shape \[3, 16\], got \[3, 8\]"),
        (lambda t: {**t, "weight": torch.randn(12)}, r"weight must be 2-d \[out, in\], got shape \[12\]"),
    ],
)
@pytest.mark.parametrize("no_grad_op", [False, True])  # lora_linear_infer shares the checks
def test_bad_inputs_raise_clear_errors(change, match, no_grad_op):
    ok = {
        "x": torch.randn(3, 16), "weight": torch.randn(12, 16), "bias": torch.randn(12),
        "lora_a": torch.randn(4, 16), "lora_b": torch.randn(12, 4), "scaling": 1.0, "lora_input": None,
    }
    args = change(ok)
    if no_grad_op and args.pop("lora_input") is not None:
        pytest.skip("lora_linear_infer takes no lora_input")
    op = torch.ops.lora_runtime.lora_linear_infer if no_grad_op else lora_linear
    with pytest.raises(RuntimeError, match=match):
        op(**args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_no_grad_op_matches_float64_reference(dtype, bias):
    """lora_linear_infer (the no-grad entry point) computes lora_linear's forward."""
    inputs = sample_inputs((3, 5), 48, 40, 8, dtype=dtype, bias=bias)
    y = torch.ops.lora_runtime.lora_linear_infer(*inputs, 0.75)
    y_ref = lora_linear_reference(*(t.double() if t is not None else None for t in inputs), 0.75)
    assert y.dtype == dtype and y.shape == (3, 5, 40)
    assert rel_err(y, y_ref) < TOL[dtype]


def test_six_argument_form_through_torch_ops():
    x, w, b, a, bb = sample_inputs((4,), 8, 8, 2)
    y = torch.ops.lora_runtime.lora_linear(x, w, b, a, bb, 0.25)
    assert rel_err(y, lora_linear_reference(*(t.double() for t in (x, w, b, a, bb)), 0.25)) < 1e-5


@pytest.mark.parametrize("bias, separate", [(True, True), (False, False)])
def test_fallback_without_the_extension_matches_float64_reference(monkeypatch, bias, separate):
    """The pure-PyTorch path `lora_linear` takes when the extension is missing, against
    `x @ W.T + b + s * (lora_input @ A.T) @ B.T` written out here (s = 3, non-zero B)."""
    import importlib

    op = importlib.import_module("lora_runtime.ops.lora_linear")  # the module (ops.lora_linear is the function)

    monkeypatch.setattr(op, "extension_loaded", lambda: False)
    x, w, b, a, bb = sample_inputs(dtype=torch.float64, bias=bias, seed=7)
    li = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) if separate else None
    got = op.lora_linear(x, w, b, a, bb, 3.0, li)
    ref = x @ w.T + 3.0 * ((x if li is None else li) @ a.T) @ bb.T  # [3, 5, 40]
    if bias:
        ref = ref + b
    assert got.shape == (3, 5, 40) and rel_err(got, ref) < TOL[torch.float64]
    assert rel_err(got, ref - (ref - x @ w.T - (b if bias else 0)) * 0.01) > 1e-4  # a 1 % scaling error shows
