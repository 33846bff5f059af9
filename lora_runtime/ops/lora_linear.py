"""The one door to `torch.ops.lora_runtime.lora_linear`: Python wrapper and fake kernels.

`lora_linear` is a CompositeImplicitAutograd op that calls `lora_linear_fwd`, which returns
the output and `h = lora_input @ lora_a.T` (`[..., r]`). Its autograd formula is C++
(`csrc/lora_autograd.cpp`): it saves `h` (and `x` only when a gradient needs it) and calls
`lora_linear_bwd`, which never recomputes the base GEMM and computes only the gradients that
are required. The fake kernels below let `torch.compile` / `torch.export` trace both.
"""

from __future__ import annotations

import torch

from lora_runtime.ops._extension import extension_loaded
from lora_runtime.ops.reference import lora_linear_reference

__all__ = ["lora_linear"]


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    lora_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused LoRA linear `x @ weight.T + bias + scaling * (lora_input @ lora_a.T) @ lora_b.T`.

    Args:
        x: input, `[..., in]`, any leading dims, any strides.
        weight: frozen base weight, `[out, in]`.
        bias: base bias `[out]`, or None.
        lora_a: `[r, in]`.
        lora_b: `[out, r]`.
        scaling: LoRA scale (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA).
        lora_input: input of the LoRA branch when it differs from `x` (LoRA dropout:
            `dropout(x)`), `[..., in]`; None means `x`.

    Returns:
        `[..., out]`, in x's dtype.

    Raises:
        RuntimeError: shapes, dtypes or devices that do not fit (the message names the
            argument and both shapes).
    """
    if extension_loaded():
        return torch.ops.lora_runtime.lora_linear(
            x, weight, bias, lora_a, lora_b, scaling, lora_input
        )
    return lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, lora_input)


if extension_loaded():

    @torch.library.register_fake("lora_runtime::lora_linear_fwd")
    def _lora_linear_fwd_fake(x, weight, bias, lora_a, lora_b, scaling, lora_input=None):
        torch._check(
            x.shape[-1] == weight.shape[1],
            lambda: f"lora_linear: x.shape={tuple(x.shape)} does not fit "
            f"weight.shape={tuple(weight.shape)}",
        )
        torch._check(
            lora_a.shape[1] == weight.shape[1] and lora_b.shape[0] == weight.shape[0]
            and lora_b.shape[1] == lora_a.shape[0],
            lambda: f"lora_linear: lora_a.shape={tuple(lora_a.shape)} / "
            f"lora_b.shape={tuple(lora_b.shape)} do not fit weight.shape={tuple(weight.shape)}",
        )
        y = x.new_empty((*x.shape[:-1], weight.shape[0]))  # [..., out]
        h = x.new_empty((*x.shape[:-1], lora_a.shape[0]))  # [..., r]
        return y, h

    @torch.library.register_fake("lora_runtime::lora_linear_bwd")
    def _lora_linear_bwd_fake(grad, x, weight, lora_a, lora_b, h, scaling, lora_input, mask):
        lead = grad.shape[:-1]
        shapes = [
            (*lead, weight.shape[1]),  # dx
            tuple(weight.shape),  # dweight
            (weight.shape[0],),  # dbias
            tuple(lora_a.shape),  # dlora_a
            tuple(lora_b.shape),  # dlora_b
            (*lead, weight.shape[1]),  # dlora_input
        ]
        return tuple(grad.new_empty(s if need else (0,)) for s, need in zip(shapes, mask))

