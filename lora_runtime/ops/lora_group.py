"""Grouped LoRA linear for siblings that read one input: wrapper and fake kernels (the
autograd formula is C++, `csrc/lora_autograd.cpp`).

`lora_group(x, weights, biases, lora_a, lora_bs, scalings)` returns, for each member i,
`x @ W_i.T + b_i + s_i * (x @ A_i.T) @ B_i.T`, where `lora_a` is the members' `A_i` stacked
along the rank (`cat(A_i)`, `[R, in]`, R = sum of the ranks). The shrink of every member is
one GEMM, and so are the backward's `dA` of the group and the LoRA part of `dx`. Base
weights and biases must be frozen: the op gives no gradient for them.
"""

from __future__ import annotations

import torch

from lora_runtime.ops._extension import extension_loaded

__all__ = ["lora_group", "lora_group_reference"]


def lora_group(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    lora_a: torch.Tensor,
    lora_bs: list[torch.Tensor],
    scalings: list[float],
) -> list[torch.Tensor]:
    """Sibling LoRA linears on one input, sharing their shrink and backward GEMMs.

    Args:
        x: the shared input, `[..., in]`.
        weights: frozen base weights, `[out_i, in]` each.
        biases: frozen base biases `[out_i]` or None, one per member.
        lora_a: the members' `lora_A` stacked along the rank, `[R, in]`.
        lora_bs: `lora_B` of each member, `[out_i, r_i]`, with `sum(r_i) == R`.
        scalings: the LoRA scale of each member.

    Returns:
        One output per member, `[..., out_i]`, in x's dtype.

    Raises:
        RuntimeError: lists of different lengths, shapes, dtypes or devices that do not fit
            (the message names the argument, its index and the shapes).
    """
    if extension_loaded():
        ys, _ = torch.ops.lora_runtime.lora_group_fwd(x, weights, biases, lora_a, lora_bs, scalings)
        return ys
    return lora_group_reference(x, weights, biases, lora_a, lora_bs, scalings)


def lora_group_reference(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    lora_a: torch.Tensor,
    lora_bs: list[torch.Tensor],
    scalings: list[float],
) -> list[torch.Tensor]:
    """The grouped formula in plain PyTorch (reference and fallback without the extension)."""
    h = torch.nn.functional.linear(x, lora_a)  # [..., R]
    ys, off = [], 0
    for w, b, lb, s in zip(weights, biases, lora_bs, scalings):
        r = lb.shape[1]
        lora = torch.nn.functional.linear(h[..., off : off + r], lb) * s  # [..., out_i]
        ys.append(torch.nn.functional.linear(x, w, b) + lora)
        off += r
    return ys


if extension_loaded():

    @torch.library.register_fake("lora_runtime::lora_group_fwd")
    def _lora_group_fwd_fake(x, weights, biases, lora_a, lora_bs, scalings):
        torch._check(
            lora_a.shape[1] == x.shape[-1],
            lambda: f"lora_group: lora_a.shape={tuple(lora_a.shape)} does not fit "
            f"x.shape={tuple(x.shape)}",
        )
        lead = x.shape[:-1]
        ys = [x.new_empty((*lead, w.shape[0])) for w in weights]  # [..., out_i]
        return ys, x.new_empty((*lead, lora_a.shape[0]))  # h: [..., R]

    @torch.library.register_fake("lora_runtime::lora_group_bwd")
    def _lora_group_bwd_fake(grads, x, weights, lora_a, lora_bs, h, scalings, nx, na, nb):
        dx = x.new_empty(x.shape if nx else (0,))
        da = x.new_empty(lora_a.shape if na else (0,))
        dbs = [x.new_empty(b.shape) for b in lora_bs] if nb else []
        return dx, da, dbs

