"""Op-level benchmark: `lora_linear` against the frozen base linear and PEFT's eager formula.

For one group `(N tokens, in, out, dtype)` the variants, all timed side by side, are:

- `base_fwd` / `base_train`: `F.linear(x, W)`; train = forward + input gradient (`W` frozen).
- `lora_fwd[r]` / `lora_train[r]`: what `LoRALinear` runs: under no grad the inference op
  `lora_linear_infer(x, W, None, A, B, s)` (no autograd formula on the way), in training
  `lora_linear(...)`; train = forward + gradients of `x`, `A`, `B`.
- `peft_fwd[r]` / `peft_train[r]`: PEFT's formula `F.linear(x, W) + B(A(x)) * s`, same
  gradients.

Forward variants run under `torch.no_grad()` (a rollout); train variants call
`torch.autograd.grad` with a fixed output gradient, so no `.grad` accumulates between calls.
The base variants do not depend on r and are timed once per group, beside all ranks.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_runtime.bench.timing import Timing, Variant, measure_interleaved
from lora_runtime.ops import lora_linear
from lora_runtime.ops.infer import lora_linear_infer

__all__ = [
    "OP_DTYPES",
    "OP_RANKS",
    "OP_SHAPES",
    "OP_TOKENS",
    "OpGroup",
    "forward_flop_limit",
    "op_groups",
    "op_variants",
    "run_op_grid",
    "train_flop_limit",
]

OP_TOKENS: tuple[int, ...] = (1, 16, 512, 4096)
OP_SHAPES: tuple[tuple[int, int], ...] = ((1024, 1024), (2048, 5504), (4096, 4096))
OP_RANKS: tuple[int, ...] = (8, 32, 64)
OP_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
SCALING = 2.0  # lora_alpha / r; any non-trivial value: both formulas multiply by it


def flop_limits(base_macs: int, lora_macs: int) -> tuple[float, float]:
    """(forward, train) FLOP ratios of LoRA over the frozen base, from multiply-adds per
    token: the base GEMMs `in*out`, the adapter `r(in+out)`. Forward `1 + lora/base`;
    training (forward + dx, dA, dB over the frozen base's forward + dx) `1 + 1.5 lora/base`
    (the base runs 2 GEMMs of in*out, LoRA adds 6 of r*in or r*out)."""
    ratio = lora_macs / base_macs
    return 1.0 + ratio, 1.0 + 1.5 * ratio


def forward_flop_limit(r: int, in_features: int, out_features: int) -> float:
    """FLOPs of a LoRA forward over the base forward: `1 + r(in+out)/(in*out)`."""
    return flop_limits(in_features * out_features, r * (in_features + out_features))[0]


def train_flop_limit(r: int, in_features: int, out_features: int) -> float:
    """FLOPs of LoRA forward+backward over the frozen base's: `1 + 1.5 r(in+out)/(in*out)`."""
    return flop_limits(in_features * out_features, r * (in_features + out_features))[1]


@dataclass(frozen=True)
class OpGroup:
    """One op-level configuration group: the ranks share the base variants."""

    tokens: int
    in_features: int
    out_features: int
    dtype: str
    ranks: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.dtype}/N{self.tokens}/{self.in_features}x{self.out_features}"


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"op benchmark: dtype {name!r} is not a floating torch dtype; "
                         f"allowed e.g. {list(OP_DTYPES)}")
    return dtype


def op_variants(group: OpGroup, device: torch.device | str = "cpu", seed: int = 0) -> list[Variant]:
    """The variants of one group (see the module docstring), on fresh random tensors."""
    dtype = _dtype(group.dtype)
    gen = torch.Generator().manual_seed(seed)
    n, fin, fout = group.tokens, group.in_features, group.out_features

    def rand(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)

    x = rand(n, fin)  # [N, in]
    x_train = x.clone().requires_grad_(True)
    weight = rand(fout, fin, std=fin**-0.5)  # [out, in], frozen
    grad_y = rand(n, fout)  # [N, out], the fixed output gradient

    def base_fwd() -> torch.Tensor:
        with torch.no_grad():
            return F.linear(x, weight)

    def base_train() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(F.linear(x_train, weight), (x_train,), grad_y)

    variants = [Variant("base_fwd", base_fwd), Variant("base_train", base_train)]
    for r in group.ranks:
        a = rand(r, fin, std=fin**-0.5).requires_grad_(True)  # [r, in]
        b = rand(fout, r, std=0.02).requires_grad_(True)  # [out, r], non-zero
        variants += _rank_variants(r, x, x_train, weight, a, b, grad_y)
    return variants


def _rank_variants(r, x, x_train, weight, a, b, grad_y) -> list[Variant]:
    def lora_fwd() -> torch.Tensor:
        with torch.no_grad():
            return lora_linear_infer(x, weight, None, a, b, SCALING)

    def lora_train() -> tuple[torch.Tensor, ...]:
        y = lora_linear(x_train, weight, None, a, b, SCALING)
        return torch.autograd.grad(y, (x_train, a, b), grad_y)

    def peft_fwd() -> torch.Tensor:
        with torch.no_grad():
            return F.linear(x, weight) + F.linear(F.linear(x, a), b) * SCALING

    def peft_train() -> tuple[torch.Tensor, ...]:
        y = F.linear(x_train, weight) + F.linear(F.linear(x_train, a), b) * SCALING
        return torch.autograd.grad(y, (x_train, a, b), grad_y)

    return [
        Variant(f"lora_fwd[r={r}]", lora_fwd),
        Variant(f"peft_fwd[r={r}]", peft_fwd),
        Variant(f"lora_train[r={r}]", lora_train),
        Variant(f"peft_train[r={r}]", peft_train),
    ]


def op_groups(
    tokens: Sequence[int] = OP_TOKENS,
    shapes: Sequence[tuple[int, int]] = OP_SHAPES,
    ranks: Sequence[int] = OP_RANKS,
    dtypes: Sequence[str] = OP_DTYPES,
) -> list[OpGroup]:
    """The grid as groups, cheapest first within each dtype."""
    return [
        OpGroup(n, fin, fout, dt, tuple(ranks))
        for dt, (fin, fout), n in itertools.product(dtypes, shapes, tokens)
    ]


def _rows(group: OpGroup, timings: dict[str, Timing]) -> list[dict]:
    """One result row per rank: raw medians and the ratios the table prints."""
    base_f, base_t = timings["base_fwd"].median_s, timings["base_train"].median_s
    rows = []
    for r in group.ranks:
        lf, pf = timings[f"lora_fwd[r={r}]"].median_s, timings[f"peft_fwd[r={r}]"].median_s
        lt, pt = timings[f"lora_train[r={r}]"].median_s, timings[f"peft_train[r={r}]"].median_s
        rows.append({
            "dtype": group.dtype, "tokens": group.tokens, "in": group.in_features,
            "out": group.out_features, "r": r,
            "median_s": {"base_fwd": base_f, "lora_fwd": lf, "peft_fwd": pf,
                         "base_train": base_t, "lora_train": lt, "peft_train": pt},
            "fwd_lora_over_base": lf / base_f, "fwd_peft_over_base": pf / base_f,
            "fwd_lora_over_peft": lf / pf,
            "fwd_flop_limit": forward_flop_limit(r, group.in_features, group.out_features),
            "train_lora_over_base": lt / base_t, "train_peft_over_base": pt / base_t,
            "train_lora_over_peft": lt / pt,
            "train_flop_limit": train_flop_limit(r, group.in_features, group.out_features),
        })
    return rows


def run_op_grid(
    groups: Sequence[OpGroup],
    device: torch.device | str = "cpu",
    budget_s: float = 1.0,
    min_repeats: int = 3,
    max_repeats: int = 15,
    log=print,
    clock: str = "wall",
) -> tuple[list[dict], dict[str, dict]]:
    """Times every group; returns (rows, raw timings keyed `group.key -> variant -> figures`)."""
    rows: list[dict] = []
    raw: dict[str, dict] = {}
    for i, group in enumerate(groups):
        timings = measure_interleaved(
            op_variants(group, device), device=device, budget_s=budget_s,
            min_repeats=min_repeats, max_repeats=max_repeats, clock=clock,
        )
        raw[group.key] = {name: t.to_json() for name, t in timings.items()}
        rows += _rows(group, timings)
        reps = len(next(iter(timings.values())).samples_s)
        log(f"  op {i + 1}/{len(groups)} {group.key}: {reps} repeats, "
            f"base_train {timings['base_train'].median_s * 1e3:.3f} ms")
    return rows, raw
