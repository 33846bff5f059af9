"""Grouped siblings: the op against float64, grouped vs per-layer models, fallbacks, compile."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from support.models import make_tiny_llama
from support.numerics import TOL, rel_err
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import lora_runtime
from lora_runtime.adapters import (
    LoRALinear,
    adapter_disabled,
    apply_lora,
    group_siblings,
    mark_only_lora_trainable,
    merged,
    sibling_groups,
    ungroup_siblings,
)
from lora_runtime.ops import lora_group, lora_group_reference

pytestmark = pytest.mark.skipif(
    not lora_runtime.extension_loaded(), reason="needs the compiled extension"
)


def group_inputs(dtype, lead=(3, 5), d_in=48, outs=(40, 24, 56), ranks=(8, 4, 6), seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    x = rnd(*lead, d_in)
    weights = [rnd(o, d_in, std=d_in**-0.5) for o in outs]
    biases = [rnd(o) if i != 1 else None for i, o in enumerate(outs)]  # member 1: no bias
    a = rnd(sum(ranks), d_in, std=d_in**-0.5)
    bs = [rnd(o, r, std=0.5) for o, r in zip(outs, ranks)]  # non-zero B
    return x, weights, biases, a, bs


def run_group(fn, inputs, scalings, used=None):
    x, weights, biases, a, bs = inputs
    x = x.detach().clone().requires_grad_(True)
    a = a.detach().clone().requires_grad_(True)
    bs = [b.detach().clone().requires_grad_(True) for b in bs]
    ys = fn(x, weights, biases, a, bs, scalings)
    gen = torch.Generator().manual_seed(9)
    loss = 0
    for i, y in enumerate(ys):
        if used is None or i in used:
            loss = loss + (y * torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)).sum()
    loss.backward()
    return ys, [x.grad, a.grad, *[b.grad for b in bs]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("used", [None, (0, 2)])
def test_group_op_matches_float64_reference(dtype, used):
    inputs = group_inputs(dtype)
    scalings = [0.5, 2.0, 1.25]
    ys, grads = run_group(lora_group, inputs, scalings, used)
    ref_inputs = [
        [t.double() if t is not None else None for t in v] if isinstance(v, list) else v.double()
        for v in inputs
    ]
    ys_ref, grads_ref = run_group(lora_group_reference, ref_inputs, scalings, used)
    for y, y_ref in zip(ys, ys_ref):
        assert y.dtype == dtype and y.shape == y_ref.shape
        assert rel_err(y, y_ref) < TOL[dtype]
    for got, ref in zip(grads, grads_ref):
        if ref is None:  # member 1 unused: its B gets no gradient in the reference
            assert got is None or got.abs().max() == 0
            continue
        assert rel_err(got, ref) < TOL[dtype] * 2


def test_group_op_gradcheck():
    x, weights, biases, a, bs = group_inputs(torch.float64, lead=(2, 3), d_in=6, outs=(5, 4), ranks=(2, 3))
    x.requires_grad_(True)
    a.requires_grad_(True)
    for b in bs:
        b.requires_grad_(True)

    def fn(x, a, b0, b1):
        return tuple(lora_group(x, weights, biases[:2], a, [b0, b1], [1.5, 0.5]))

    assert torch.autograd.gradcheck(fn, (x, a, *bs))  # opcheck: test_opcheck.py


def test_group_op_rejects_bad_input_with_named_argument():
    x, weights, biases, a, bs = group_inputs(torch.float32)
    with pytest.raises(RuntimeError, match=r"the ranks of lora_bs sum to 18 but the stacked lora_a has 17"):
        lora_group(x, weights, biases, a[:17], bs, [1.0] * 3)
    with pytest.raises(RuntimeError, match=r"weights\[2\] must be \[out, 48\]"):
        lora_group(x, [*weights[:2], weights[2][:, :10]], biases, a, bs, [1.0] * 3)
    with pytest.raises(RuntimeError, match=r"one entry per member, got 3, 3, 3, 2"):
        lora_group(x, weights, biases, a, bs, [1.0] * 2)
    with pytest.raises(RuntimeError, match=r"lora_bs\[0\] has dtype BFloat16 but x has dtype Float"):
        lora_group(x, weights, biases, a, [bs[0].bfloat16(), *bs[1:]], [1.0] * 3)


class Siblings(nn.Module):
    """Attention-like q/k/v on one normed input, a gated MLP (gate/up), and a mode in which
    k reads a different tensor than q and v (members that part ways at run time)."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, 16, bias=False), nn.Linear(dim, dim)
        self.gate, self.up, self.down = nn.Linear(dim, 48), nn.Linear(dim, 48), nn.Linear(48, dim)
        self.split = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q = self.q(h)
        k = self.k(h * 2 if self.split else h)
        v = self.v(h)
        att = torch.softmax(q[..., :16] @ k.transpose(-1, -2), dim=-1) @ v  # [B, T, dim]
        x = x + att
        h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def patch_siblings(dtype=torch.float32, dropout=0.0, seed=0) -> nn.Module:
    """Different ranks and scalings per member, non-zero B."""
    torch.manual_seed(seed)
    model = Siblings().to(dtype)
    specs = {"q": (4, 8.0), "k": (8, 4.0), "v": (2, 1.0), "gate": (6, 3.0), "up": (3, 12.0), "down": (4, 4.0)}
    for name, (r, alpha) in specs.items():
        setattr(model, name, LoRALinear(getattr(model, name), r, alpha, lora_dropout=dropout))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for p in (m.lora_A.weight, m.lora_B.weight):
                    p.copy_(torch.randn(p.shape, generator=gen).to(dtype) * 0.3)
    mark_only_lora_trainable(model)
    return model


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def step(model, x, seed=3):
    torch.manual_seed(seed)  # the same dropout masks on both sides
    y = model(x)
    (y.double() * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape)).sum().backward()
    return y.detach()


def test_groups_found_generically():
    model = patch_siblings()
    groups = group_siblings(model, torch.randn(2, 3, 32))
    assert groups == [["q", "k", "v"], ["gate", "up"]]
    assert sibling_groups(model) == groups
    ungroup_siblings(model)
    assert sibling_groups(model) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split", [False, True])
def test_grouped_matches_per_layer_and_float64(dtype, split):
    ungrouped = patch_siblings(dtype)
    grouped = copy.deepcopy(ungrouped)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4)).to(dtype)
    assert len(group_siblings(grouped, x)) == 2
    reference = copy.deepcopy(ungrouped).double()
    for m in (ungrouped, grouped, reference):
        m.split = split  # split: k reads another tensor, so k falls back to its own path
    y_ref = step(reference, x.double())
    y_u, y_g = step(ungrouped, x), step(grouped, x)
    tol = TOL[dtype] * (20 if dtype == torch.float32 else 1)
    assert rel_err(y_g, y_ref) < tol and rel_err(y_u, y_ref) < tol
    if dtype == torch.float32:
        assert rel_err(y_g, y_u) < 1e-5
    g_ref, g_u, g_g = grads_of(reference), grads_of(ungrouped), grads_of(grouped)
    assert set(g_g) == set(g_u) == set(g_ref) and len(g_g) == 12  # every lora_A / lora_B
    for name in g_ref:
        err_g, err_u = rel_err(g_g[name], g_ref[name]), rel_err(g_u[name], g_ref[name])
        if dtype == torch.float32:
            assert err_g < 1e-4 and err_u < 1e-4, name
        else:  # bf16 through softmax and norms: no worse than the per-layer path's rounding
            assert err_g <= 2 * err_u + 0.02, (name, err_g, err_u)


def test_dropout_keeps_per_layer_masks_and_matches_ungrouped():
    ungrouped = patch_siblings(dropout=0.3).train()
    grouped = copy.deepcopy(ungrouped)
    x = torch.randn(2, 5, 32)
    group_siblings(grouped, x)
    y_u, y_g = step(ungrouped, x), step(grouped, x)
    assert torch.equal(y_u, y_g)
    g_u, g_g = grads_of(ungrouped), grads_of(grouped)
    for name in g_u:
        assert torch.equal(g_g[name], g_u[name]), name
    grouped.eval()  # dropout off in eval: the grouped op runs, and still matches
    ungrouped.eval()
    with torch.no_grad():
        assert rel_err(grouped(x), ungrouped(x)) < 1e-5


def test_input_changed_in_place_between_members_is_not_served_stale():
    model = patch_siblings()
    group_siblings(model, torch.randn(1, 2, 32))
    h = torch.randn(2, 3, 32)
    with torch.no_grad():
        q = model.q(h)
        h.mul_(3.0)  # same tensor object, new values: k must see them
        k = model.k(h)
        ref_q = model.q._layer_forward(h / 3.0)
        ref_k = model.k._layer_forward(h)
    assert rel_err(q, ref_q) < 1e-5 and rel_err(k, ref_k) < 1e-5


def test_disabled_merged_and_no_grad_paths_match():
    model = patch_siblings()
    plain = copy.deepcopy(model)
    x = torch.randn(2, 4, 32)
    group_siblings(model, x)
    with torch.no_grad():
        assert rel_err(model(x), plain(x)) < 1e-5
        for _ in range(2):  # the no-grad cache of the stacked A follows parameter updates
            for m in (model, plain):
                m.q.lora_A.weight.add_(0.1)
            assert rel_err(model(x), plain(x)) < 1e-5
        with adapter_disabled(model), adapter_disabled(plain):
            assert torch.equal(model(x), plain(x))
        with merged(model), merged(plain):
            assert rel_err(model(x), plain(x)) < 1e-5
    with torch.inference_mode():  # rollouts: inference tensors carry no version counter
        assert rel_err(model(x), plain(x)) < 1e-5


def test_llama_groups_qkv_and_gate_up_and_matches():
    model = apply_lora(make_tiny_llama(layers=2), 4, alpha=8)
    from support.models import randomize_lora

    randomize_lora(model)
    mark_only_lora_trainable(model)
    plain = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    groups = group_siblings(model, input_ids=ids)
    attn = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkv"]
    mlp = [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up")]
    assert sorted(p for g in groups for p in g) == sorted(attn + mlp) and len(groups) == 4
    outs = []
    for m in (plain, model):
        logits = m(input_ids=ids).logits
        logits.square().mean().backward()
        outs.append(logits.detach())
    assert rel_err(outs[1], outs[0]) < 1e-5
    g_p, g_m = grads_of(plain), grads_of(model)
    for name in g_p:
        assert rel_err(g_m[name], g_p[name]) < 1e-4, name


def test_compile_no_added_breaks_and_no_recompiles():
    model = patch_siblings()
    x = torch.randn(2, 5, 32)
    group_siblings(model, x)
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    plain = copy.deepcopy(model)
    ungroup_siblings(plain)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(4):
        opt.zero_grad()
        compiled(x).square().mean().backward()
        opt.step()
        with torch.no_grad():
            with adapter_disabled(compiled):
                compiled(x)
            compiled(x)
    frames = counter.frame_count
    for _ in range(3):
        opt.zero_grad()
        compiled(x).square().mean().backward()
        opt.step()
        with torch.no_grad(), adapter_disabled(compiled):
            compiled(x)
    assert counter.frame_count == frames  # steps and toggles reuse the compiled graphs
    assert model.q._group._x is None  # no activation held between calls
    for p in plain.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        plain.load_state_dict(model.state_dict())
        assert rel_err(compiled(x), plain(x)) < 1e-5


def test_grouped_training_matches_ungrouped_on_the_distributed_models():
    """The models of the FSDP2/DDP parity tests (which run grouped) train the same ungrouped."""
    from support import dist_worker as W

    for kind in ("llama", "tiny"):
        runs = []
        for grouped in (True, False):
            model = W.build(kind, grouped=grouped)
            runs.append(W.train(model, model, slice(None)))
        got, ref = runs
        assert abs(got["loss"] - ref["loss"]) < 1e-6
        for name, g in ref["grads"].items():
            assert rel_err(got["grads"][name], g) < 1e-4, name
        for name, v in ref["adapters"].items():
            assert rel_err(got["adapters"][name], v) < 1e-4, name
        assert rel_err(got["logits"], ref["logits"]) < 1e-4


def test_builtin_actor_siblings_are_grouped_and_the_switch_defaults_on(tmp_path):
    from support.tiny_runs import tiny_raw

    from lora_runtime.actor import prepare_actor
    from lora_runtime.config import validate_config
    from lora_runtime.rl.actor_setup import group_actor_siblings
    from lora_runtime.rl.models.vla import build_tiny_vla

    run_cfg = validate_config(tiny_raw(tmp_path / "out", tmp_path / "base"))
    assert run_cfg.actor.model.group_siblings is True
    actor = prepare_actor(build_tiny_vla(run_cfg.actor.builtin), run_cfg.actor.model)
    plain = copy.deepcopy(actor)
    groups = group_actor_siblings(run_cfg, actor)
    assert groups and all(len(g) >= 2 for g in groups) and sibling_groups(actor) == groups
    gen = torch.Generator().manual_seed(0)
    pixels, ids = torch.rand(3, 3, 8, 8, generator=gen), torch.randint(0, 24, (3, 4), generator=gen)
    for m in (actor, plain):
        for _, layer in m.named_modules():
            if isinstance(layer, LoRALinear):
                torch.nn.init.normal_(layer.lora_B.weight, generator=torch.Generator().manual_seed(1))
    assert rel_err(actor(pixels, ids, 1), plain(pixels, ids, 1)) < 1e-5
