"""torch.export on patched models: the graph holds the fused LoRA op and matches eager;
after merge_lora it holds no LoRA op."""

from __future__ import annotations

import copy

import pytest
import torch
from support.models import make_tiny_llama, randomize_lora
from torch import nn
from torch.export import Dim

from lora_runtime import extension_loaded
from lora_runtime.adapters import apply_lora, merge_lora

pytestmark = pytest.mark.skipif(
    not extension_loaded(), reason="the fused op exists only with the compiled extension"
)

LORA_OP = "lora_runtime.lora_linear.default"


class Logits(nn.Module):
    """Exports `model(input_ids, use_cache=False).logits` of a transformers model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits  # [B, T, vocab]


def make_model(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A patched model with non-zero adapters and an input for it."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    if kind == "llama":
        model = Logits(apply_lora(make_tiny_llama(layers=1), 4, alpha=8))
        x = torch.randint(0, 128, (2, 12), generator=gen)  # [B, T]
    else:
        model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        apply_lora(model, 4, alpha=8, target_modules=["0", "2"])
        x = torch.randn(2, 12, 32, generator=gen)  # [B, T, in]
    randomize_lora(model)
    return model.eval(), x


def ops(program: torch.export.ExportedProgram) -> list[str]:
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("kind", ["llama", "mlp"])
def test_export_holds_the_lora_op_and_matches_eager(kind):
    model, x = make_model(kind)
    program = torch.export.export(model, (x,))
    assert ops(program).count(LORA_OP) == (8 if kind == "llama" else 2)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(program.module()(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "mlp"])
def test_export_after_merge_lora_has_no_lora_op(kind):
    model, x = make_model(kind)
    with torch.no_grad():
        lora_out = model(x)
    merge_lora(model)
    program = torch.export.export(model, (x,))
    names = ops(program)
    assert not any("lora" in name for name in names)
    assert "aten.linear.default" in names
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), rtol=1e-6, atol=1e-6)
        assert ((program.module()(x) - lora_out).abs().max() / lora_out.abs().max()) < 1e-5


def test_export_with_a_symbolic_sequence_length():
    model, x = make_model("mlp")
    eager = copy.deepcopy(model)
    program = torch.export.export(model, (x,), dynamic_shapes=({1: Dim("seq", min=2, max=64)},))
    assert ops(program).count(LORA_OP) == 2
    for length in (3, 12, 40):
        y = torch.randn(2, length, 32)
        with torch.no_grad():
            assert torch.allclose(program.module()(y), eager(y), rtol=1e-6, atol=1e-6)
