"""The compiled extension is active under `make test`; without it the package still works."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

import lora_runtime


def test_extension_is_loaded():
    assert lora_runtime.extension_loaded(), lora_runtime.ops._extension.extension_error()
    assert hasattr(torch.ops.lora_runtime, "lora_linear")


FALLBACK = textwrap.dedent(
    """
    import sys, warnings
    sys.modules["lora_runtime.ops._C"] = None  # makes `from lora_runtime.ops import _C` fail
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import lora_runtime
        import lora_runtime.ops  # the package loads the extension on first use
    import torch
    from torch import nn
    from lora_runtime.adapters.layer import LoRALinear
    assert not lora_runtime.extension_loaded()
    assert sum("pure-PyTorch reference path" in str(w.message) for w in caught) == 1
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), 4)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 16, requires_grad=True)
    y = layer(x)
    ref = layer.base_layer(x) + x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    assert torch.allclose(y, ref, atol=1e-6)
    y.sum().backward()
    assert layer.lora_A.weight.grad is not None
    print("fallback ok")
    """
)


def test_pure_pytorch_fallback_with_one_warning():
    out = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "fallback ok" in out.stdout


def test_every_required_op_is_built_and_a_missing_one_is_named():
    from lora_runtime.ops._extension import REQUIRED_OPS, _missing_ops

    assert _missing_ops() == []
    # the dispatcher itself: every required op has a schema and a kernel that runs on the CPU
    # (its own or the composite one), and the library defines no op the list leaves out
    # (a build missing that op would then not be called stale)
    defined = {name.removeprefix("lora_runtime::") for name in torch._C._dispatch_get_all_op_names()
               if name.startswith("lora_runtime::")}
    assert defined == set(REQUIRED_OPS)
    for name in REQUIRED_OPS:
        torch._C._dispatch_find_schema_or_throw(f"lora_runtime::{name}", "")  # raises when missing
        assert any(torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_runtime::{name}", key)
                   for key in ("CPU", "CompositeExplicitAutograd", "CompositeImplicitAutograd")), name
    assert _missing_ops(("lora_linear", "no_such_op_here")) == ["no_such_op_here"]
    # a build without the C++ autograd formula would train nothing: named too
    assert _missing_ops((), (("lora_linear_fwd", "Autograd"), ("lora_linear_infer", "Autograd"))) == [
        "lora_linear_infer (Autograd)"
    ]
