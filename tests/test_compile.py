"""The actor under torch.compile: no graph breaks, no recompilation in a steady loop or on
adapter_disabled / merged switches, compiled == eager; adapter_disabled == the base model.

Graph and recompilation counts come from `torch._dynamo.testing.CompileCounterWithBackend`
(one count per compiled frame), never from timing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from support.models import make_tiny_llama, randomize_lora
from support.numerics import rel_err_l2
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from lora_runtime.adapters import (
    MergeError,
    adapter_disabled,
    apply_lora,
    iter_lora_layers,
    mark_only_lora_trainable,
    merged,
    unwrap_model,
)
from lora_runtime.compile import compile_actor

KINDS = ["llama", "mlp"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Breaking(nn.Module):
    """Two linears with a deliberate graph break between them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc1(x))  # [B, T, 64]
        torch._dynamo.graph_break()
        return self.fc2(h)  # [B, T, 32]


def make_pair(kind: str) -> tuple[nn.Module, nn.Module]:
    """(unpatched base, patched copy with non-zero adapters, only adapters trainable).

    "mlp" patched is made only of the runtime's layers: LoRALinear, GELU, LoRALinear.
    """
    torch.manual_seed(0)
    if kind == "llama":
        base, targets = make_tiny_llama(layers=1), None
    elif kind == "mlp":
        base, targets = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)), ["0", "2"]
    else:
        base, targets = Breaking(), ["fc1", "fc2"]
    kwargs = {"target_modules": targets} if targets else {}
    patched = apply_lora(copy.deepcopy(base), 4, alpha=8, **kwargs)
    randomize_lora(patched)
    mark_only_lora_trainable(patched)
    return base.eval(), patched.eval()


def make_input(kind: str, length: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(length)
    if kind == "llama":
        return torch.randint(0, 128, (2, length), generator=gen)  # [B, T] token ids
    return torch.randn(2, length, 32, generator=gen)  # [B, T, in]


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.long:
        return model(input_ids=x, use_cache=False).logits  # [B, T, vocab]
    return model(x)


def train_step(model: nn.Module, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    forward(model, x).float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def adapter_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def test_compile_actor_forwards_every_keyword(monkeypatch):
    calls = []

    def recording_compile(model, **kwargs):
        calls.append((model, kwargs))
        return model

    _, model = make_pair("mlp")
    monkeypatch.setattr(torch, "compile", recording_compile)
    kwargs = {"backend": "inductor", "mode": "max-autotune", "dynamic": True, "fullgraph": True}
    assert compile_actor(model, **kwargs) is model
    assert calls == [(model, kwargs)]


def test_compile_actor_keywords_reach_dynamo():
    _, breaking = make_pair("breaking")
    with pytest.raises(torch._dynamo.exc.Unsupported):
        compile_actor(breaking, backend="eager", fullgraph=True)(make_input("mlp"))
    _, model = make_pair("mlp")
    counter = CompileCounterWithBackend("eager")
    compiled = compile_actor(model, backend=counter, dynamic=False)
    for length in (5, 6, 7):
        compiled(make_input("mlp", length))
    assert counter.frame_count == 3  # dynamic=False: one static graph per length


def test_compiled_actor_shares_the_model():
    _, model = make_pair("mlp")
    compiled = compile_actor(model, backend="eager")
    assert unwrap_model(compiled) is model
    assert [p for p in compiled.parameters()] == [p for p in model.parameters()]
    assert [path for path, _ in iter_lora_layers(compiled)] == ["0", "2"]


def test_compile_actor_rejects_bad_input():
    _, model = make_pair("mlp")
    with pytest.raises(TypeError, match=r"no keyword \['backnd'\]; allowed: \[.*'backend'"):
        compile_actor(model, backnd="eager")
    with pytest.raises(TypeError, match="already a torch.compile wrapper"):
        compile_actor(torch.compile(model, backend="eager"))
    with pytest.raises(TypeError, match="must be an nn.Module, got function"):
        compile_actor(lambda x: x)


@pytest.mark.parametrize("kind", ["llama", "mlp", "breaking"])
def test_lora_layers_add_no_graph_breaks(kind):
    base, patched = make_pair(kind)
    x = make_input(kind)
    before = torch._dynamo.explain(forward)(base, x)
    torch._dynamo.reset()
    after = torch._dynamo.explain(forward)(patched, x)
    assert after.graph_break_count == before.graph_break_count == (1 if kind == "breaking" else 0)
    assert after.graph_count == before.graph_count


@pytest.mark.parametrize("kind", KINDS)
def test_fullgraph_still_compiles_after_patching(kind):
    base, patched = make_pair(kind)
    x = make_input(kind)
    for model in (base, patched):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = compile_actor(model, backend=counter, fullgraph=True)
        forward(compiled, x).square().mean().backward()  # forward and backward, one graph
        assert counter.frame_count == 1
    assert all(layer.lora_B.weight.grad is not None for _, layer in iter_lora_layers(patched))


@pytest.mark.parametrize("kind", KINDS)
def test_inductor_forward_and_backward_match_eager(kind):
    _, eager = make_pair(kind)
    compiled = compile_actor(copy.deepcopy(eager), backend="inductor", fullgraph=True)
    x = make_input(kind)
    outputs = []
    for model in (eager, compiled):
        y = forward(model, x)
        y.square().mean().backward()
        outputs.append(y)
    assert rel_err_l2(outputs[1], outputs[0]) < 1e-5
    grads = dict(unwrap_model(compiled).named_parameters())
    for name, p in eager.named_parameters():
        if p.requires_grad:
            assert rel_err_l2(grads[name].grad, p.grad) < 1e-5, name


@pytest.mark.parametrize("kind", KINDS)
def test_training_loop_and_mode_switches_do_not_recompile(kind):
    """The RL actor's cycle: train; reference log-probs (adapter_disabled); rollouts (merged)."""
    base, eager = make_pair(kind)
    counter = CompileCounterWithBackend("aot_eager")
    model = compile_actor(eager, backend=counter)
    optimizer = adapter_optimizer(model)
    x = make_input(kind)
    train_step(model, x, optimizer)  # warm-up
    assert counter.frame_count == 1
    for _ in range(20):
        train_step(model, x, optimizer)
    assert counter.frame_count == 1  # steady loop: no recompilation
    counts = []
    for _ in range(3):
        with torch.no_grad():
            with adapter_disabled(model):
                reference = forward(model, x)  # reference log-probs
            policy = forward(model, x)
            with merged(model):
                rollout = forward(model, x)  # rollouts at base-model speed
            assert torch.equal(reference, forward(base, x))  # compiled, disabled == eager base
            assert rel_err_l2(rollout, policy) < 1e-5  # merged == LoRA path
        train_step(model, x, optimizer)
        counts.append(counter.frame_count)
    assert counts == [4, 4, 4]  # one graph per mode (and no_grad), the first time only
    assert counts[-1] <= torch._dynamo.config.recompile_limit


@pytest.mark.parametrize("kind", KINDS)
def test_varying_sequence_lengths_compile_at_most_twice(kind):
    _, eager = make_pair(kind)
    counter = CompileCounterWithBackend("aot_eager")
    model = compile_actor(eager, backend=counter)  # dynamic=None: static, then symbolic length
    optimizer = adapter_optimizer(model)
    for length in (7, 12, 5, 16, 9):
        train_step(model, make_input(kind, length), optimizer)
    assert counter.frame_count <= 2
    x = make_input(kind, 11)  # a sixth length, served by the symbolic graph
    assert rel_err_l2(forward(model, x).detach(), forward(eager, x).detach()) < 1e-5
    assert counter.frame_count <= 2


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_disabled_is_the_base_model_bit_for_bit(kind):
    base, model = make_pair(kind)
    x = make_input(kind)
    params = {name: (p.data_ptr(), p._version) for name, p in model.named_parameters()}
    with torch.no_grad():
        lora_out, base_out = forward(model, x), forward(base, x)
        with adapter_disabled(model) as inside:
            assert inside is model
            assert torch.equal(forward(model, x), base_out)
            same = {name: (p.data_ptr(), p._version) for name, p in model.named_parameters()}
            assert same == params  # no weight copied or written
        assert not torch.equal(lora_out, base_out)
        assert torch.equal(forward(model, x), lora_out)
    assert all(not layer.disable_adapters for _, layer in iter_lora_layers(model))


def test_adapter_disabled_nests_and_restores_flags_after_errors():
    _, model = make_pair("mlp")
    with adapter_disabled(model):
        with adapter_disabled(model):
            pass
        assert all(layer.disable_adapters for _, layer in iter_lora_layers(model))
    with pytest.raises(KeyError), adapter_disabled(model):
        raise KeyError("reference pass failed")
    assert all(not layer.disable_adapters for _, layer in iter_lora_layers(model))


def test_adapter_disabled_refuses_full_mode_and_merged_models():
    base, model = make_pair("mlp")
    no_lora = "no LoRA layers.*reference model must be kept separately"
    with pytest.raises(ValueError, match=no_lora), adapter_disabled(base):
        pytest.fail("the body must not run")
    with merged(model):
        refused = "layer '0' is merged by merged"
        with pytest.raises(MergeError, match=refused), adapter_disabled(model):
            pytest.fail("the body must not run")
        assert all(not layer.disable_adapters for _, layer in iter_lora_layers(model))
