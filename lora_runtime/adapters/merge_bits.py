"""Bit-level helpers of `merged(...)`'s exact restore: bit patterns, checksums, packed masks."""

from __future__ import annotations

import torch

__all__ = ["bits", "checksum", "pack", "unpack"]

_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor as integers of the same width (no copy)."""
    if t.element_size() not in _INT_VIEW:
        raise TypeError(f"merged: weight dtype {t.dtype} is not supported (16/32/64-bit floats)")
    return t.view(_INT_VIEW[t.element_size()])


def checksum(t: torch.Tensor) -> int:
    return int(bits(t).sum(dtype=torch.int64))


def pack(mask: torch.Tensor) -> torch.Tensor:
    """bool [n] -> uint8 [ceil(n / 8)], 8 flags a byte."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """uint8 [ceil(n / 8)] -> bool `shape`."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(1) >> shifts) & 1  # [n / 8, 8]
    return bits.reshape(-1)[: shape.numel()].view(shape).bool()
