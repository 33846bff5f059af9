"""Deployable files of a patched model: TorchScript and AOTInductor packages.

- `export_torchscript(model, example_inputs, path, method="script" | "trace")` writes a
  `torch.jit` file (`torch.jit.load` in Python, `torch::jit::load` in C++);
- `export_aoti(model, example_inputs, path)` exports the forward with `torch.export` and
  compiles it with `torch._inductor.aoti_compile_and_package` into a `.pt2` package
  (`torch._inductor.aoti_load_package` in Python, `torch::inductor::AOTIModelPackageLoader`
  in C++).

With unmerged adapters the file calls the fused op (`torch.ops.lora_runtime.*`): the
process that loads it must load the op library first,
`torch.ops.load_library(lora_runtime.ops.library_path())` (or link / `dlopen` that file in
C++); nothing else of lora-runtime is needed there. With `merged=True` the adapters are
folded into a copy first (`merge_lora`), and the file needs nothing but torch.
The model passed in is never modified. A model whose forward returns an output object with
`.logits` (a transformers `...ForCausalLM`) is exported as its logits (`LogitsOnly`):
the file returns one tensor. Use `method="trace"` for those (transformers models do not script).
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from lora_runtime._fs import atomic_file, check_writable
from lora_runtime.adapters import iter_lora_layers, merge_lora, unwrap_model

__all__ = [
    "LogitsOnly", "check_output_file", "deployable_copy", "export_aoti", "export_torchscript", "needs_op_library",
]


class LogitsOnly(nn.Module):
    """`model(*inputs).logits`: a model whose forward returns an output object (a
    transformers `ModelOutput` such as `CausalLMOutputWithPast`, which neither the tracer
    nor `torch.export` can return) seen as one returning its logits tensor. The exporters
    wrap such a model themselves; the KV cache is turned off when `forward` takes `use_cache`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.no_cache = "use_cache" in inspect.signature(model.forward).parameters

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(*inputs, use_cache=False) if self.no_cache else self.model(*inputs)
        return out.logits


def _returns_logits_object(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> bool:
    with torch.no_grad():
        out = model(*inputs)
    return not isinstance(out, (torch.Tensor, tuple, list)) and isinstance(getattr(out, "logits", None), torch.Tensor)


def deployable_copy(model: nn.Module, merged: bool = False) -> nn.Module:
    """An eval-mode deep copy of `model` (compile / DDP wrappers removed), merged if asked.

    Raises:
        ValueError: `merged=True` on a model without LoRA layers, or non-finite adapters.
    """
    inner = copy.deepcopy(unwrap_model(model)).eval()
    if merged:
        merge_lora(inner)
    return inner


def _exportable(model: nn.Module, merged: bool, inputs: tuple[torch.Tensor, ...]) -> nn.Module:
    """`deployable_copy`, frozen, and wrapped in `LogitsOnly` when it returns an output object."""
    inner = deployable_copy(model, merged)
    for p in inner.parameters():
        p.requires_grad_(False)
    return LogitsOnly(inner) if _returns_logits_object(inner, inputs) else inner


def check_output_file(path: str | os.PathLike, suffix: str, overwrite: bool = True) -> str:
    """The absolute path of an export file, checked before any work (the one place these
    rules live: the exporters below and `lora-runtime export` call it).

    Args:
        path: the file to write.
        suffix: the ending it must have (".pt", ".pt2").
        overwrite: allow an existing file (replaced atomically); False refuses it.

    Raises:
        ValueError: the wrong suffix, an existing file (with `overwrite=False`), or a folder
            that does not exist or is not writable; the message names the path.
    """
    path = os.path.abspath(os.fspath(path))
    if not path.endswith(suffix):
        raise ValueError(f"the output file {path!r} must end with {suffix!r}")
    if not overwrite and os.path.lexists(path):
        raise ValueError(f"the output file {path!r} already exists")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ValueError(f"the folder {parent} of the output file {path!r} does not exist")
    try:
        check_writable(parent)
    except OSError as exc:
        raise ValueError(f"the folder {parent} of the output file {path!r} is not writable ({exc.strerror or exc})") from None
    return path


def export_torchscript(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: str | os.PathLike,
    method: Literal["script", "trace"] = "script",
    merged: bool = False,
) -> str:
    """Writes `model` as a TorchScript file (`.pt`).

    Args:
        model: a patched (or plain) model; not modified.
        example_inputs: positional inputs of `forward` (tracing runs them; scripting only
            checks that the scripted module accepts them).
        path: the `.pt` file to write (its folder must exist); written atomically.
        method: "script" (`torch.jit.script`, keeps control flow) or "trace".
        merged: fold the adapters into the copy first (the file needs only torch).

    Returns:
        The absolute path written.

    Raises:
        ValueError: a bad `path` or `method`.
    """
    if method not in ("script", "trace"):
        raise ValueError(f"export_torchscript: method={method!r}; allowed: 'script', 'trace'")
    path = check_output_file(path, ".pt")
    inner = _exportable(model, merged, tuple(example_inputs))
    with torch.no_grad():
        module = torch.jit.script(inner) if method == "script" else torch.jit.trace(inner, tuple(example_inputs))
        module(*example_inputs)  # fails here, not in the deployment, on inputs it cannot take
    with atomic_file(path) as staging:
        torch.jit.save(module, staging)
    return path


def export_aoti(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: str | os.PathLike,
    merged: bool = False,
    dynamic_batch: bool = True,
) -> str:
    """Exports `model.forward` with `torch.export` and writes an AOTInductor package (`.pt2`).

    Args:
        model: a patched (or plain) model; not modified.
        example_inputs: positional inputs of `forward`; every other size is fixed to theirs.
        path: the `.pt2` file to write (its folder must exist); written atomically.
        merged: fold the adapters into the copy first (the package needs only torch).
        dynamic_batch: leave dim 0 of every input free (one shared batch size, >= 1).

    Returns:
        The absolute path written.

    Raises:
        ValueError: a bad `path`.
    """
    path = check_output_file(path, ".pt2")
    inputs = tuple(example_inputs)
    inner = _exportable(model, merged, inputs)
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        dynamic = tuple({0: batch} for _ in inputs)
    with torch.no_grad():
        program = torch.export.export(inner, inputs, dynamic_shapes=dynamic, strict=False)
    with atomic_file(path, suffix=".pt2") as staging:
        torch._inductor.aoti_compile_and_package(program, package_path=staging)
    return path


def needs_op_library(model: nn.Module) -> bool:
    """True when an unmerged export of `model` calls the fused op (it has LoRA layers)."""
    return any(True for _ in iter_lora_layers(model))
