"""The library on a CUDA device, against float64 references on the CPU.

Skipped where torch sees no GPU (this project's CI has none); run on a lent GPU machine with
`python -m pytest tests/test_cuda.py`. The LoRA ops are ATen calls registered once for every device
(csrc/README.md), and `merged()` takes the tensor-op store on devices other than the CPU:
these tests pin both, plus the patched model (grouped siblings included), torch.compile and
the adapter files written from GPU tensors.
"""

from __future__ import annotations

import pytest
import torch
from support.models import make_tiny_llama, randomize_lora
from support.numerics import TOL, rel_err
from torch._dynamo.testing import CompileCounterWithBackend

import lora_runtime
from lora_runtime.adapters import (
    apply_lora,
    iter_lora_layers,
    load_adapter,
    mark_only_lora_trainable,
    merged,
    merged_weight,
    save_adapter,
)
from lora_runtime.adapters.grouping import group_siblings
from lora_runtime.compile import compile_actor
from lora_runtime.ops import lora_linear
from lora_runtime.ops.lora_group import lora_group, lora_group_reference
from lora_runtime.ops.reference import lora_linear_reference

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not lora_runtime.extension_loaded(), reason="needs the compiled extension"),
]

CUDA = torch.device("cuda")
# support.numerics.TOL against float64 on the CPU; TF32 is off in these tests


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def draw(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) * std for s, std in shapes]


def with_grads(fn, tensors, *rest, grad_seed=9, frozen=()):
    leaves = [t.detach().clone().requires_grad_(i not in frozen) for i, t in enumerate(tensors)]
    y = fn(*leaves, *rest)
    ys = y if isinstance(y, list) else [y]
    g = torch.Generator().manual_seed(grad_seed)
    sum((out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)).sum() for out in ys).backward()
    return ys, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dropout_input", [False, True])
def test_op_forward_and_backward_match_float64_reference(dtype, dropout_input):
    d_in, d_out, r = 96, 80, 16
    x, w, b, a, bb, lx = draw([((4, 7, d_in), 1.0), ((d_out, d_in), d_in**-0.5), ((d_out,), 1.0),
                               ((r, d_in), d_in**-0.5), ((d_out, r), 0.5), ((4, 7, d_in), 1.0)])
    scaling = 1.7
    if dropout_input:
        inputs = [x, w, b, a, bb, lx]

        def ours(x, w, b, a, bb, lx):
            return lora_linear(x, w, b, a, bb, scaling, lx)

        def ref(x, w, b, a, bb, lx):
            return lora_linear_reference(x, w, b, a, bb, scaling, lx)
    else:
        inputs = [x, w, b, a, bb]

        def ours(x, w, b, a, bb):
            return lora_linear(x, w, b, a, bb, scaling)

        def ref(x, w, b, a, bb):
            return lora_linear_reference(x, w, b, a, bb, scaling)

    (y,), grads = with_grads(ours, [t.to(CUDA, dtype) for t in inputs])
    (y_ref,), grads_ref = with_grads(ref, inputs)
    assert y.device.type == "cuda" and y.dtype == dtype
    assert rel_err(y, y_ref) < TOL[dtype]
    for got, want in zip(grads, grads_ref):
        assert got.device.type == "cuda"
        assert rel_err(got, want) < 4 * TOL[dtype]
    with torch.no_grad():  # the no-grad entry point (what decode runs)
        y_ng = lora_linear(*[t.to(CUDA, dtype) for t in inputs[:5]], scaling, *[t.to(CUDA, dtype) for t in inputs[5:]])
    assert torch.equal(y_ng, y.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_op_matches_float64_reference(dtype):
    d_in, outs, ranks = 64, (64, 32, 32), (8, 8, 8)
    shapes = [((5, 3, d_in), 1.0), ((sum(ranks), d_in), d_in**-0.5)]
    shapes += [((o, d_in), d_in**-0.5) for o in outs] + [((o,), 1.0) for o in outs]
    shapes += [((o, r), 0.5) for o, r in zip(outs, ranks)]
    x, a, *rest = draw(shapes, seed=3)
    ws, bs, lbs = rest[:3], rest[3:6], rest[6:]
    scalings = [2.0, 0.5, 1.0]

    def call(fn):
        def run(x, a, w0, w1, w2, b0, b1, b2, lb0, lb1, lb2):
            return fn(x, [w0, w1, w2], [b0, b1, b2], a, [lb0, lb1, lb2], scalings)
        return run

    frozen = range(2, 8)  # the base weights and biases (the grouped op keeps the base frozen)
    ys, grads = with_grads(call(lora_group), [t.to(CUDA, dtype) for t in [x, a, *ws, *bs, *lbs]], frozen=frozen)
    ys_ref, grads_ref = with_grads(call(lora_group_reference), [x, a, *ws, *bs, *lbs], frozen=frozen)
    for got, want in zip(ys, ys_ref):
        assert got.device.type == "cuda" and rel_err(got, want) < TOL[dtype]
    for i in (0, 1, 8, 9, 10):  # dx, d(stacked A), dB of each member
        assert rel_err(grads[i], grads_ref[i]) < 4 * TOL[dtype], i


def patched_llama(dtype=torch.float32, device=CUDA):
    model = apply_lora(make_tiny_llama(seed=0), 8, alpha=16, generator=torch.Generator().manual_seed(0))
    randomize_lora(model, std=0.05, seed=1)
    return model.to(device, dtype)


def lora_grads(model):
    return {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}


def test_patched_llama_on_cuda_matches_float64_cpu_with_grouped_siblings():
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    ref = patched_llama(torch.float64, "cpu")
    mark_only_lora_trainable(ref)
    ref(ids).logits.square().mean().backward()

    model = patched_llama()
    mark_only_lora_trainable(model)
    groups = group_siblings(model, ids[:1].to(CUDA))
    assert any(len(g) == 3 for g in groups)  # q/k/v share their input
    logits = model(ids.to(CUDA)).logits
    logits.square().mean().backward()
    assert rel_err(logits, ref(ids).logits) < 1e-5
    got, want = lora_grads(model), lora_grads(ref)
    assert set(got) == set(want) and all("lora_" in n for n in got)
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-4, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merged_on_cuda_is_the_float64_merge_and_restores_bit_exactly(dtype):
    model = patched_llama(dtype)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2)).to(CUDA)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        unmerged = model(ids).logits
        with merged(model):
            inside = {n: p.detach().clone() for n, p in model.named_parameters()}
            merged_logits = model(ids).logits
    for name, layer in iter_lora_layers(model):
        base = before[f"{name}.base_layer.weight"].double()
        delta = layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
        want = base + delta  # the float64 merge
        got = inside[f"{name}.base_layer.weight"]
        assert (got.double() - want).abs().max() <= want.abs().max() * TOL[dtype], name
        assert torch.equal(got, merged_weight(layer)), name  # the same rounding as merged_weight()
    for n, p in model.named_parameters():  # leaving restores every bit
        assert torch.equal(p, before[n]), n
    assert rel_err(merged_logits, unmerged.double()) < 5 * TOL[dtype]


def test_compiled_training_step_on_cuda_has_no_graph_break_and_matches_eager():
    torch._dynamo.reset()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7)).to(CUDA)
    eager = patched_llama()
    mark_only_lora_trainable(eager)
    compiled_model = patched_llama()
    mark_only_lora_trainable(compiled_model)
    counter = CompileCounterWithBackend("inductor")
    compiled = compile_actor(compiled_model, backend=counter)
    for _ in range(2):  # the second call must not recompile
        out = compiled(ids).logits
        out.square().mean().backward()
    eager_out = eager(ids).logits
    (eager_out.square().mean() * 2).backward()  # two backward passes accumulated, as above
    assert counter.frame_count == 1
    assert rel_err(out, eager_out.double()) < 1e-5
    got, want = lora_grads(compiled_model), lora_grads(eager)
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-4, name
    torch._dynamo.reset()


def test_adapter_saved_from_cuda_loads_on_cpu_bit_exactly(tmp_path):
    model = patched_llama(torch.bfloat16)
    save_adapter(model, tmp_path / "adapter")
    cpu = apply_lora(make_tiny_llama(seed=0), 8, alpha=16).to(torch.bfloat16)
    load_adapter(cpu, tmp_path / "adapter")
    want = dict(iter_lora_layers(model))
    for name, layer in iter_lora_layers(cpu):
        assert torch.equal(layer.lora_A.weight, want[name].lora_A.weight.cpu()), name
        assert torch.equal(layer.lora_B.weight, want[name].lora_B.weight.cpu()), name
        assert layer.scaling == want[name].scaling == 2.0
