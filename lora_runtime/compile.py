"""The actor under `torch.compile`: `compile_actor`.

`compile_actor` returns `torch.compile(model, ...)`. `LoRALinear.forward` is one call of
the fused op (whose fake kernel works on symbolic shapes) or, with `disable_adapters` /
`merged` set, `base_layer(x)`. Dynamo guards on those two flags, so each state in use
compiles once and later switches reuse the cached graphs: a patched model compiles to as
many graphs as the base model, plus one per state actually entered (adapters disabled,
merged). With `dynamic=None`, a sequence length that changes compiles once more, with a
symbolic length, and later lengths reuse that graph.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

__all__ = ["compile_actor"]

_COMPILE_KWARGS = tuple(
    name for name in inspect.signature(torch.compile).parameters if name != "model"
)


def compile_actor(model: nn.Module, **torch_compile_kwargs: Any) -> nn.Module:
    """Compiles a patched (or full-mode) actor with `torch.compile`.

    Returns `torch.compile(model, **torch_compile_kwargs)`: a wrapper (`OptimizedModule`)
    that shares `model`'s parameters and traces its whole call, whatever module type sits
    at the top. (`model.compile()` in place would start tracing at the first frame outside
    torch, so an `nn.Sequential` of LoRA layers would compile one frame per layer.) Every
    function of the runtime (`adapter_disabled`, `merged`, `save_adapter`,
    `iter_merged_weights`, ...) unwraps it and uses the model's own names; the wrapper's
    own `state_dict()` has PyTorch's `_orig_mod.` prefix.

    Args:
        model: the actor (patched, or unpatched for full mode); not already compiled.
        **torch_compile_kwargs: forwarded to `torch.compile` unchanged (`backend`, `mode`,
            `dynamic`, `fullgraph`, `options`, ...). `dynamic` defaults to None: static
            shapes first, one symbolic recompilation when a size changes.

    Returns:
        The compiled actor; `unwrap_model(result) is model`.

    Raises:
        TypeError: `model` is not an `nn.Module`, is already a `torch.compile` wrapper, or
            a keyword `torch.compile` does not take (the message lists the allowed ones).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile_actor: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError(
            "compile_actor: model is already a torch.compile wrapper (OptimizedModule); "
            "pass the module itself"
        )
    unknown = sorted(set(torch_compile_kwargs) - set(_COMPILE_KWARGS))
    if unknown:
        raise TypeError(
            f"compile_actor: torch.compile takes no keyword {unknown}; "
            f"allowed: {list(_COMPILE_KWARGS)}"
        )
    return torch.compile(model, **torch_compile_kwargs)
