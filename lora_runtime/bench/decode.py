"""Decode and per-call benchmarks: `generate` with a KV cache, and one layer's call cost.

- `time_decode`: `model.generate` (greedy, KV cache, 16-token prompt, 32 new tokens) at
  batch 1, 8 and 32 for the frozen base, this runtime unmerged, inside `merged(...)`, and
  HF PEFT unmerged; ratios of medians from one interleaved run per batch size. Only for
  models with `generate` (the tiny Llama); the built-in actor's decode is its rollout.
- `time_layer_calls`: the per-call cost of one patched 512x512 layer under `no_grad` at
  N in {1, 8, 16} tokens: `nn.Linear`, `LoRALinear`, PEFT's `lora.Linear`, side by side.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack

import torch
from torch import nn

from lora_runtime.adapters import LoRALinear, merged
from lora_runtime.bench.timing import Variant, measure_interleaved

__all__ = ["DECODE_BATCHES", "DECODE_VARIANTS", "LAYER_TOKENS", "time_decode", "time_layer_calls"]

DECODE_BATCHES = (1, 8, 32)
DECODE_VARIANTS = ("base", "lora_unmerged", "lora_merged", "peft_unmerged")
LAYER_TOKENS = (1, 8, 16)
PROMPT, NEW_TOKENS = 16, 32


def time_decode(bench, batches=DECODE_BATCHES, **timing) -> dict:
    """`{batch: {variant: Timing json}}` of `generate` for the variants of `bench`.

    Args:
        bench: a `model.ModelBench` whose model has `generate` (transformers).
        batches: the batch sizes.
        **timing: passed to `measure_interleaved` (budget_s, min_repeats, max_repeats, clock).
    """
    vocab = bench.base.config.vocab_size
    stack = ExitStack()
    models = {"base": bench.base, "lora_unmerged": bench.lora_model(),
              "lora_merged": bench.lora_model(), "peft_unmerged": bench.peft_model()}
    out: dict = {}
    try:
        stack.enter_context(merged(models["lora_merged"]))
        for batch in batches:
            gen = torch.Generator().manual_seed(batch)
            ids = torch.randint(0, vocab, (batch, PROMPT), generator=gen).to(bench.device)

            def decode(model: nn.Module, ids: torch.Tensor = ids):
                def call() -> torch.Tensor:
                    with torch.no_grad():
                        return model.generate(ids, attention_mask=torch.ones_like(ids),
                                              max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                              do_sample=False, use_cache=True, pad_token_id=0)
                return call

            variants = [Variant(name, decode(m.eval())) for name, m in models.items()]
            t = measure_interleaved(variants, device=bench.device, warmup=1, **timing)
            out[str(batch)] = {k: v.to_json() for k, v in t.items()}
    finally:
        stack.close()
    return out


def _peft_linear(base: nn.Linear, r: int, a: torch.Tensor, b: torch.Tensor) -> nn.Module:
    from peft import LoraConfig, get_peft_model  # deferred: peft is optional

    model = get_peft_model(nn.Sequential(base), LoraConfig(r=r, lora_alpha=r, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    return layer.eval()


def time_layer_calls(size: int = 512, r: int = 32, tokens=LAYER_TOKENS, **timing) -> dict:
    """`{N: {variant: Timing json}}`: one no-grad call of `nn.Linear`, ours and PEFT's."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    linear = nn.Linear(size, size)
    a = torch.randn(r, size, generator=gen) / r  # [r, in]
    b = torch.randn(size, r, generator=gen) * 0.02  # [out, r], non-zero
    ours = LoRALinear(linear, r, r).eval()
    with torch.no_grad():
        ours.lora_A.weight.copy_(a)
        ours.lora_B.weight.copy_(b)
    peft = _peft_linear(copy.deepcopy(linear), r, a, b)
    out = {}
    for n in tokens:
        x = torch.randn(n, size, generator=gen)

        def call(module: nn.Module, x: torch.Tensor = x):
            def fn() -> torch.Tensor:
                with torch.no_grad():
                    return module(x)
            return fn

        variants = [Variant("linear", call(linear)), Variant("lora", call(ours)),
                    Variant("peft", call(peft))]
        t = measure_interleaved(variants, min_sample_s=0.005, **timing)
        out[str(n)] = {k: v.to_json() for k, v in t.items()}
    return out
