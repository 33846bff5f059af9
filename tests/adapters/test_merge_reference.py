"""Merge, weight sync and the CLI merge against an independent float64 reference computed
from A, B and the scaling the test chose (never from the function under test), with
scaling != 1 and per-dtype tolerances that a 1 % scaling error fails."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from support.isolation import isolated
from support.models import make_tiny_llama
from support.tiny_runs import write_yaml
from torch import nn

from lora_runtime.adapters import (
    LoRALinear,
    apply_lora,
    iter_lora_layers,
    iter_merged_weights,
    merge_lora,
    merged,
    merged_weight,
    save_adapter,
)

R, ALPHA = 4, 12.0
SCALING = ALPHA / R  # 3.0, written out here, not read from a layer
# |merged - exact| <= REL * |exact| + ABS * max|exact|: rounding once to the dtype (half an
# ulp, with slack), plus the float32 (float64) error of the delta where W and it cancel.
TOL = {
    torch.float64: (1e-14, 1e-13),
    torch.float32: (2**-24 * 1.01, 1e-6),
    torch.float16: (2**-11 * 1.01, 1e-6),
    torch.bfloat16: (2**-8 * 1.01, 1e-6),
}
DTYPES = list(TOL)


def big_adapters(model: nn.Module, std: float = 0.3, seed: int = 5) -> None:
    """Random non-zero A and B whose delta dominates W, so a 1 % error in the delta is a
    ~1 % error in the merged weight (more than a bf16 ulp)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in iter_lora_layers(model):
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std)


def patched(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 32, bias=False))
    model = apply_lora(model, R, alpha=ALPHA, target_modules=["0", "2"]).to(dtype)
    big_adapters(model)
    return model


def exact(layer: LoRALinear, scaling: float = SCALING) -> torch.Tensor:
    """`W + scaling * B @ A` in float64 from the layer's tensors."""
    return layer.base_layer.weight.double() + scaling * (layer.lora_B.weight.double() @ layer.lora_A.weight.double())


def within(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    rel, abs_ = TOL[dtype]
    return bool(((got.double() - ref).abs() <= rel * ref.abs() + abs_ * ref.abs().max()).all())


def check(got: torch.Tensor, layer_ref: torch.Tensor, wrong_ref: torch.Tensor, dtype, what: str) -> None:
    assert got.dtype == dtype, what
    assert within(got, layer_ref, dtype), f"{what}: off the float64 reference"
    assert not within(got, wrong_ref, dtype), f"{what}: the tolerance cannot see a 1 % scaling error"


def references(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """path -> (exact merged weight, the same with the scaling 1 % off)."""
    return {p: (exact(layer), exact(layer, SCALING * 1.01)) for p, layer in iter_lora_layers(model)}


@pytest.mark.parametrize("dtype", DTYPES)
def test_merged_weight_matches_float64_reference(dtype):
    model = patched(dtype)
    for path, (ref, wrong) in references(model).items():
        check(merged_weight(model.get_submodule(path)), ref, wrong, dtype, path)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merged_context_matches_float64_reference(dtype):
    model = patched(dtype)
    refs = references(model)
    with merged(model, max_extra_fraction=10.0):
        for path, (ref, wrong) in refs.items():
            check(model.get_submodule(path).base_layer.weight, ref, wrong, dtype, path)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_lora_matches_float64_reference(dtype):
    model = patched(dtype)
    refs = references(model)
    merge_lora(model)
    for path, (ref, wrong) in refs.items():
        check(model.get_submodule(path).weight, ref, wrong, dtype, path)


@pytest.mark.parametrize("dtype", DTYPES)
def test_iter_merged_weights_match_float64_reference(dtype):
    model = patched(dtype)
    refs = references(model)
    got = dict(iter_merged_weights(model))
    assert set(got) == {"0.weight", "0.bias", "2.weight"}
    for path, (ref, wrong) in refs.items():
        check(got[f"{path}.weight"], ref, wrong, dtype, path)
    assert torch.equal(got["0.bias"], model.get_submodule("0").base_layer.bias)


def test_rslora_scaling_in_the_merge():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 16), R, lora_alpha=ALPHA, use_rslora=True).double()
    big_adapters(layer)
    rs = ALPHA / 2.0  # alpha / sqrt(4)
    assert within(merged_weight(layer), exact(layer, rs), torch.float64)
    assert not within(merged_weight(layer), exact(layer, rs * 1.01), torch.float64)


def test_cli_merge_matches_float64_reference(tmp_path, capsys):
    """`lora-runtime merge` of an adapter with alpha 12, r 4 (scaling 3) over a Llama folder."""
    from lora_runtime.cli import main

    base = make_tiny_llama(layers=1)
    base.save_pretrained(tmp_path / "llama", safe_serialization=True)
    model = apply_lora(make_tiny_llama(layers=1), R, alpha=ALPHA)
    with isolated():
        big_adapters(model, std=0.1)
    save_adapter(model, tmp_path / "adapter")
    raw = {"actor": {"model": {"is_lora": True, "lora_rank": R, "model_path": str(tmp_path / "llama")}},
           "task": {"grid": 2, "num_objects": 2, "num_colors": 3},
           "trainer": {"output_dir": str(tmp_path / "run")}}
    config = write_yaml(tmp_path / "c.yaml", raw)
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"), config]) == 0
    capsys.readouterr()
    files = list((tmp_path / "merged").glob("*.safetensors"))
    got = {}
    for f in files:
        got.update(load_file(f))
    layers = dict(iter_lora_layers(model))
    assert layers
    for path, layer in layers.items():
        check(got[f"{path}.weight"], exact(layer), exact(layer, SCALING * 1.01), torch.float32, path)
    untouched = base.state_dict()["model.embed_tokens.weight"]
    assert torch.equal(got["model.embed_tokens.weight"], untouched)
