"""The one door to `torch.ops.lora_runtime`: Python wrapper, fake kernels and autograd.

`lora_linear` is a CompositeImplicitAutograd op that calls `lora_linear_fwd`, which returns
the output and `h = lora_input @ lora_a.T` (`[..., r]`). The autograd formula below saves
`h` (and `x` only when a gradient needs it) and calls the C++ `lora_linear_bwd`, which never
recomputes the base GEMM and computes only the gradients that are required.
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

    def _setup_context(ctx, inputs, output):
        x, weight, _bias, lora_a, lora_b, scaling, lora_input = inputs
        _, h = output
        _, need_w, _, need_a, need_b, _ = ctx.needs_input_grad[:6]
        separate = lora_input is not None
        keep_x = need_w or (need_a and not separate)
        ctx.scaling = scaling
        ctx.separate = separate
        ctx.mark_non_differentiable(h)
        ctx.save_for_backward(
            x if keep_x else None,
            weight,
            lora_a,
            lora_b,
            h if need_b else None,
            lora_input if (separate and need_a) else None,
        )

    def _backward(ctx, grad_y, _grad_h):
        x, weight, lora_a, lora_b, h, lora_input = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2], need[3], need[4], ctx.separate and need[6]]
        if ctx.separate and need[3] and lora_input is None:
            raise RuntimeError("lora_linear backward: lora_input was not saved")
        if ctx.separate and lora_input is None:
            # Only the shape matters for dlora_input / dx when A is frozen.
            lora_input = torch.empty(0, dtype=grad_y.dtype, device=grad_y.device)
        grads = torch.ops.lora_runtime.lora_linear_bwd(
            grad_y, x, weight, lora_a, lora_b, h, ctx.scaling,
            lora_input if ctx.separate else None, mask,
        )
        dx, dw, db, da, dlb, dli = (g if m else None for g, m in zip(grads, mask))
        return dx, dw, db, da, dlb, None, dli

    torch.library.register_autograd(
        "lora_runtime::lora_linear_fwd", _backward, setup_context=_setup_context
    )
