"""How far a result is from its float64 reference, and how far each dtype may be.

Every numerical test compares against a reference computed in float64 (never against golden
numbers) and allows the error of the dtype it ran in, from the one table below.
"""

from __future__ import annotations

import torch

# Largest relative error (`rel_err`) allowed of a result computed in each dtype: a few units
# of its last place (float32 2^-24, float16 2^-11, bfloat16 2^-8 ~ 3.9e-3) grown by sums over
# a few hundred terms and a few layers in a row (a patched two-layer model in bfloat16 is
# 1.3e-2 from float64 in tests/adapters/test_grouping.py; one op call stays under 1e-2).
TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, in float64 on the CPU (0 / 0 counts as 0)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def rel_err_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| (Frobenius), in float64 on the CPU: the error of a whole
    tensor, where `rel_err` is the error of its worst element."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return ((got - ref).norm() / ref.norm()).item()
