"""Op level: `lora_linear` vs the frozen base linear vs PEFT's eager formula, over the grid
of the issue (tokens x (in, out) x r x dtype). Select with -k, e.g.
`pytest bench/test_bench_op.py -k "N512 and float32"`."""

from __future__ import annotations

import itertools

import pytest

from lora_runtime.bench.op import (
    OP_DTYPES,
    OP_RANKS,
    OP_SHAPES,
    OP_TOKENS,
    OpGroup,
    forward_flop_limit,
    op_variants,
    train_flop_limit,
)
from lora_runtime.bench.timing import synced

CONFIGS = [
    pytest.param(n, fin, fout, dt, id=f"{dt}-N{n}-{fin}x{fout}")
    for dt, (fin, fout), n in itertools.product(OP_DTYPES, OP_SHAPES, OP_TOKENS)
]


@pytest.mark.parametrize("variant", ["base_fwd", "base_train"])
@pytest.mark.parametrize("tokens,fin,fout,dtype", CONFIGS)
def test_base(benchmark, device, tokens, fin, fout, dtype, variant):
    group = OpGroup(tokens, fin, fout, dtype, ranks=())
    fn = {v.name: v.fn for v in op_variants(group, device)}[variant]
    benchmark.group = f"op {group.key}"
    benchmark(synced(fn, device))


@pytest.mark.parametrize("variant", ["lora_fwd", "peft_fwd", "lora_train", "peft_train"])
@pytest.mark.parametrize("r", OP_RANKS, ids=lambda r: f"r{r}")
@pytest.mark.parametrize("tokens,fin,fout,dtype", CONFIGS)
def test_lora(benchmark, device, tokens, fin, fout, dtype, r, variant):
    group = OpGroup(tokens, fin, fout, dtype, ranks=(r,))
    fn = {v.name: v.fn for v in op_variants(group, device)}[f"{variant}[r={r}]"]
    benchmark.group = f"op {group.key}"
    limit = train_flop_limit if variant.endswith("train") else forward_flop_limit
    benchmark.extra_info["flop_limit_vs_base"] = limit(r, fin, fout)
    benchmark(synced(fn, device))
