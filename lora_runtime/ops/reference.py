"""Pure-PyTorch LoRA linear: the reference for tests and benchmarks, and the fallback
used when the compiled extension is not available."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    lora_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ weight.T + bias + scaling * (lora_input @ lora_a.T) @ lora_b.T` with plain ops.

    Args:
        x: `[..., in]`.
        weight: `[out, in]`.
        bias: `[out]` or None.
        lora_a: `[r, in]`.
        lora_b: `[out, r]`.
        scaling: the LoRA scale `alpha / r` (or `alpha / sqrt(r)`).
        lora_input: input of the LoRA branch (x after dropout), `[..., in]`; None means x.

    Returns:
        `[..., out]`.
    """
    lx = x if lora_input is None else lora_input
    return F.linear(x, weight, bias) + F.linear(F.linear(lx, lora_a), lora_b) * scaling
