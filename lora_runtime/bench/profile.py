"""Where a train step's time goes: torch.profiler self-CPU time by category.

`lora-runtime bench --profile` runs each train-step variant of a model under
`torch.profiler` for a few steps and splits the self time of every op into:

- `base GEMMs`: matrix products with no dimension equal to the adapter rank r (the
  frozen model's linears, their input gradients, full fine-tune weight gradients);
- `rank-r GEMMs`: products with a dimension equal to r (the adapter's arithmetic);
- `attention`: `scaled_dot_product_*` kernels;
- `optimizer`: everything under `Optimizer.step` / `zero_grad`;
- `LoRA op glue`: self time of this runtime's op wrappers (`lora_runtime::*` and their
  autograd nodes), i.e. dispatch overhead of the fused ops;
- `other ops`: all remaining aten ops (norms, activations, loss, copies, adds, ...).

Profiler timestamps cost a little per op, so op-heavy variants look slightly worse here
than in the timed figures; the split is what matters.

`profile_decode` does the same for `generate` (decode with a KV cache) of the frozen base,
this runtime unmerged and PEFT, and adds `outside ops`: wall time not inside any profiled op
(the Python of `generate`, of the model's modules and of the LoRA layers).
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from lora_runtime.bench.model import ModelBench

__all__ = ["CATEGORIES", "format_profile", "profile_decode", "profile_train_steps"]

CATEGORIES = ("base GEMMs", "rank-r GEMMs", "attention", "optimizer", "LoRA op glue", "other ops")
_GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::mm.out")


def _category(name: str, shapes, rank: int) -> str:
    if name in _GEMMS:
        # 2-d products only: a batched product's batch size may equal r by chance.
        dims = [d for s in shapes or [] if len(s or []) == 2 for d in s]
        return "rank-r GEMMs" if "bmm" not in name and rank in dims else "base GEMMs"
    if "scaled_dot_product" in name:
        return "attention"
    if name.startswith("lora_runtime::") or "lora_runtime_lora" in name:
        return "LoRA op glue"
    return "other ops"


_OPTIMIZER = ("Optimizer.step#", "Optimizer.zero_grad#")


def _inside_optimizer(ev) -> bool:
    node = ev
    while node is not None:
        if node.name.startswith(_OPTIMIZER):
            return True
        node = node.cpu_parent
    return False


def profile_train_steps(bench: ModelBench, variants, steps: int = 3) -> dict[str, dict]:
    """Milliseconds per step by category (and `total`) for each train-step variant.

    Args:
        bench: the model's variants.
        variants: train-step variant names (see `bench_model.TRAIN_VARIANTS`).
        steps: profiled steps per variant (after 2 warm-up steps).

    Returns:
        `{variant: {category: ms per step, "total": ms per step}}`.
    """
    out: dict[str, dict] = {}
    for variant in variants:
        step = bench.train_step(variant)
        for _ in range(2):
            step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                step()
        split = dict.fromkeys(CATEGORIES, 0.0)
        for ev in prof.events():
            cat = "optimizer" if _inside_optimizer(ev) else _category(ev.name, ev.input_shapes, bench.rank)
            split[cat] += ev.self_cpu_time_total / 1e3 / steps
        split["total"] = sum(split.values())
        out[variant] = split
    return out


def profile_decode(bench: ModelBench, batch: int = 8, calls: int = 2) -> dict[str, dict]:
    """Milliseconds per `generate` call by category, plus `outside ops` and `total` (wall).

    Args:
        bench: the model's variants; the model must have `generate` (transformers).
        batch: prompts per call (16-token prompts, 32 new tokens, greedy, KV cache).
        calls: profiled calls per variant (after one warm-up call).

    Returns:
        `{variant: {category: ms per call, "outside ops": ms, "total": wall ms}}` for
        `base`, `lora_unmerged`, `peft_unmerged`.
    """
    from lora_runtime.bench.decode import NEW_TOKENS, PROMPT  # deferred: decode imports adapters

    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, bench.base.config.vocab_size, (batch, PROMPT), generator=gen)
    ids = ids.to(bench.device)
    models = {"base": bench.base, "lora_unmerged": bench.lora_model(),
              "peft_unmerged": bench.peft_model()}
    out: dict[str, dict] = {}
    for variant, model in models.items():
        model.eval()

        def call(model=model) -> None:
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                               pad_token_id=0)

        call()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            for _ in range(calls):
                call()
            wall_ms = (time.perf_counter() - start) * 1e3 / calls
        split = {cat: 0.0 for cat in CATEGORIES if cat != "optimizer"}
        for ev in prof.events():
            split[_category(ev.name, ev.input_shapes, bench.rank)] += ev.self_cpu_time_total / 1e3 / calls
        split["outside ops"] = max(0.0, wall_ms - sum(split.values()))
        split["total"] = wall_ms
        out[variant] = split
    return out


def format_profile(model: str, split: dict[str, dict]) -> str:
    """A table: one row per category, one column per variant (ms per step, self CPU)."""
    variants = list(split)
    unit = "ms/step" if "optimizer" in split[variants[0]] else "ms/generate"
    head = f"  {'profile ' + model + f' ({unit})':32}" + "".join(f"{v:>14}" for v in variants)
    lines = [head]
    for cat in [c for c in split[variants[0]] if c != "total"] + ["total"]:
        lines.append(f"  {cat:32}" + "".join(f"{split[v][cat]:>14.1f}" for v in variants))
    return "\n".join(lines)
