"""TorchScript (script and trace) and AOTInductor files of a patched model, run in a fresh
Python process that imports only torch (plus the op library for unmerged adapters)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from lora_runtime.adapters import LoRALinear, apply_lora, iter_lora_layers
from lora_runtime.deploy import export_aoti, export_torchscript
from lora_runtime.ops import extension_loaded, library_path

pytestmark = pytest.mark.skipif(not extension_loaded(), reason="the fused op library is not built")

RUNNER = """
import sys, torch
kind, model_path, inputs_path, out_path, lib = sys.argv[1:6]
if lib != "-":
    torch.ops.load_library(lib)
inputs = torch.load(inputs_path)
model = torch.jit.load(model_path) if kind == "torchscript" else torch._inductor.aoti_load_package(model_path)
with torch.no_grad():
    out = model(*inputs)
assert not [m for m in sys.modules if m.startswith("lora_runtime")], "the runner imported lora_runtime"
torch.save(out, out_path)
"""


def mlp() -> nn.Module:
    """Linear(8, 16) -> GELU -> Linear(16, 4), both adapted (rank 2), non-zero lora_B, with dropout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    apply_lora(model, 2, alpha=4, dropout=0.1, target_modules=["0", "2"])
    for _, layer in iter_lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.2)
    return model.eval()


def float64_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


def run_fresh(tmp_path, kind: str, path: str, inputs: tuple, with_library: bool) -> subprocess.CompletedProcess:
    (tmp_path / "runner.py").write_text(RUNNER)
    torch.save(inputs, tmp_path / "inputs.pt")
    lib = library_path() if with_library else "-"
    argv = [sys.executable, str(tmp_path / "runner.py"), kind, path, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt"), lib]
    return subprocess.run(argv, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def assert_matches(tmp_path, expected: torch.Tensor, rel: float = 1e-5) -> None:
    got = torch.load(tmp_path / "out.pt").double()
    assert ((got - expected).abs().max() / expected.abs().max()) < rel


def test_loralinear_forward_is_scriptable_in_every_state():
    """Pins LoRALinear.forward to TorchScript (annotated Optional, no Python-only calls)."""
    layer = LoRALinear(nn.Linear(8, 6), r=2, lora_dropout=0.5)
    nn.init.normal_(layer.lora_B.weight, std=0.3)
    scripted = torch.jit.script(layer)
    x = torch.randn(4, 8)
    layer.eval(), scripted.eval()
    torch.testing.assert_close(scripted(x), layer(x), rtol=0, atol=0)
    expected = x.double() @ (layer.base_layer.weight.double() + layer.scaling * layer.lora_B.weight.double()
                             @ layer.lora_A.weight.double()).T + layer.base_layer.bias.double()
    assert (scripted(x).double() - expected).abs().max() < 1e-5
    scripted.train()
    torch.manual_seed(3)
    dropped = scripted(x)  # dropout on the LoRA branch only
    assert not torch.allclose(dropped, layer(x))
    scripted.disable_adapters = True
    torch.testing.assert_close(scripted(x), layer.base_layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["script", "trace"])
def test_torchscript_unmerged_runs_in_a_fresh_process_with_the_op_library(tmp_path, method):
    model, x = mlp(), torch.randn(5, 8)
    path = export_torchscript(model, (x,), tmp_path / "m.pt", method=method)
    done = run_fresh(tmp_path, "torchscript", path, (x,), with_library=True)
    assert done.returncode == 0, done.stderr
    assert_matches(tmp_path, float64_reference(model, x))
    without = run_fresh(tmp_path, "torchscript", path, (x,), with_library=False)
    assert without.returncode != 0 and "lora_runtime::lora_linear" in without.stderr


def test_torchscript_merged_needs_nothing_of_ours(tmp_path):
    model, x = mlp(), torch.randn(5, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_torchscript(model, (x,), tmp_path / "m.pt", method="script", merged=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not modified
    done = run_fresh(tmp_path, "torchscript", path, (x,), with_library=False)
    assert done.returncode == 0, done.stderr
    assert_matches(tmp_path, float64_reference(model, x))


def test_aoti_package_unmerged_runs_in_a_fresh_process(tmp_path):
    model, x = mlp(), torch.randn(3, 8)
    path = export_aoti(model, (x,), tmp_path / "m.pt2")
    other = torch.randn(7, 8)  # another batch size: dim 0 is dynamic
    done = run_fresh(tmp_path, "aoti", path, (other,), with_library=True)
    assert done.returncode == 0, done.stderr
    assert_matches(tmp_path, float64_reference(model, other))


def test_export_refuses_bad_paths_and_methods(tmp_path):
    model, x = mlp(), torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"must end with '\.pt'"):
        export_torchscript(model, (x,), tmp_path / "m.bin")
    with pytest.raises(ValueError, match="does not exist"):
        export_torchscript(model, (x,), tmp_path / "nope" / "m.pt")
    with pytest.raises(ValueError, match="method='jit'; allowed"):
        export_torchscript(model, (x,), tmp_path / "m.pt", method="jit")
    assert list(tmp_path.iterdir()) == []


def test_export_replaces_an_existing_file_and_leaves_nothing_else(tmp_path):
    model, x = mlp(), torch.randn(2, 8)
    (tmp_path / "m.pt").write_bytes(b"an earlier export")
    export_torchscript(model, (x,), tmp_path / "m.pt", method="trace")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left beside it
    torch.testing.assert_close(torch.jit.load(tmp_path / "m.pt")(x), model(x), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # transformers' own shape checks, traced as constants
def test_a_transformers_causal_lm_exports_as_its_logits(tmp_path, tiny_llama, token_ids):
    """`LlamaForCausalLM` returns `CausalLMOutputWithPast`, which the tracer cannot return:
    the exporter exports its logits, and the file runs without transformers."""
    apply_lora(tiny_llama, 2, alpha=4, target_modules=["q_proj", "v_proj"])
    for _, layer in iter_lora_layers(tiny_llama):
        nn.init.normal_(layer.lora_B.weight, std=0.2)
    with torch.no_grad():
        expected = tiny_llama(token_ids).logits.double()
    path = export_torchscript(tiny_llama, (token_ids,), tmp_path / "llama.pt", method="trace")
    proc = run_fresh(tmp_path, "torchscript", path, (token_ids,), with_library=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_matches(tmp_path, expected, rel=1e-4)
