"""The tiny Llama's speed ratios as a library user gets them: a plain script, public API only.

No harness: the adapters come from `lora_runtime.prepare_actor` with the config's defaults
(r = 32, alpha = r, the default targets: the seven projections and `lm_head`), the optimizer is
torch's `AdamW` as a user writes it. Every figure is a ratio of two medians of samples taken
interleaved in this one process (each repeat runs every variant once, in an order rotated by
one per repeat), so a change of machine load hits both sides alike. The load average is
printed at the start and the end: on a shared machine, read the ratios with it.

    .venv/bin/python bench/plain_ratios.py                 # about 3-4 minutes on 2 idle cores
    .venv/bin/python bench/plain_ratios.py --repeats 5 --skip-decode

Rows:
- train: zero_grad, forward + loss, backward, optimizer step, over the frozen base's step
  (no adapters; the input embeddings require grad so the backward runs through every layer,
  nothing to step), for the default path and for grouped siblings / fused AdamW beside it;
- decode: `generate` with KV cache (16-token prompt, 32 new tokens, greedy) at batch 1, 8, 32,
  unmerged and inside `merged()`, over the base model's `generate`;
- merged(): entering and leaving `merged(model)` once, in forwards of the train batch (no grad).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lora_runtime
from lora_runtime import ActorModelConfig, merged, prepare_actor
from lora_runtime.adapters import group_siblings


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=8000,
                      max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def patched(base: LlamaForCausalLM) -> LlamaForCausalLM:
    """`prepare_actor` with the config's defaults, and non-zero lora_B (a trained adapter)."""
    model = prepare_actor(copy.deepcopy(base), ActorModelConfig(is_lora=True), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_runtime.iter_lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.02)
    return model


def interleaved(variants: dict, repeats: int) -> dict[str, float]:
    """Median seconds per variant; one warm-up call each (not recorded)."""
    for fn in variants.values():
        fn()
    names, samples = list(variants), {name: [] for name in variants}
    for rep in range(repeats):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            t0 = time.perf_counter()
            variants[name]()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def train_step(model, batch, opt):
    def step():
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        model(batch, labels=batch).loss.backward()
        if opt is not None:
            opt.step()

    return step


def train_rows(base, batch, repeats):
    frozen = copy.deepcopy(base).requires_grad_(False)
    frozen.get_input_embeddings().weight.requires_grad_(True)  # backward through every layer
    default = patched(base).train()
    grouped = patched(base).train()
    group_siblings(grouped, batch[:1, :8])
    fused = patched(base).train()

    def adamw(model, **kw):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, **kw)

    t = interleaved({
        "base": train_step(frozen.train(), batch, None),
        "default": train_step(default, batch, adamw(default)),
        "grouped": train_step(grouped, batch, adamw(grouped)),
        "fused_adamw": train_step(fused, batch, adamw(fused, fused=True)),
    }, repeats)
    return {
        "train default (prepare_actor, AdamW()) / frozen": t["default"] / t["base"],
        "train + group_siblings / frozen": t["grouped"] / t["base"],
        "train + AdamW(fused=True) / frozen": t["fused_adamw"] / t["base"],
    }


def decode_rows(base, repeats, batches=(1, 8, 32)):
    lora = patched(base).eval()
    lora_m = patched(base).eval()
    rows = {}
    with merged(lora_m):
        for b in batches:
            prompt = torch.randint(0, 8000, (b, 16), generator=torch.Generator().manual_seed(b))

            def gen(model, prompt=prompt):
                def run():
                    with torch.no_grad():
                        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                                       min_new_tokens=32, do_sample=False, pad_token_id=0)
                return run

            t = interleaved({"base": gen(base), "unmerged": gen(lora), "merged": gen(lora_m)}, repeats)
            rows[f"decode b{b} unmerged / base"] = t["unmerged"] / t["base"]
            rows[f"decode b{b} merged / base"] = t["merged"] / t["base"]
    return rows


def merged_row(base, batch, repeats):
    model = patched(base).eval()

    def forward():
        with torch.no_grad():
            model(batch)

    def enter_leave():
        with merged(model):
            pass

    t = interleaved({"forward": forward, "enter_leave": enter_leave}, repeats)
    return {"merged() enter + leave / forward": t["enter_leave"] / t["forward"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, extension loaded: "
          f"{lora_runtime.extension_loaded()}, load average at start: {os.getloadavg()}")
    base = tiny_llama()
    batch = torch.randint(0, 8000, (4, 128), generator=torch.Generator().manual_seed(0))
    parts = [] if args.skip_train else [lambda: train_rows(base, batch, args.repeats)]
    parts.append(lambda: merged_row(base, batch, args.repeats))
    if not args.skip_decode:
        parts.append(lambda: decode_rows(base, max(3, args.repeats // 2)))
    for part in parts:
        for name, ratio in part().items():
            print(f"  {name:<52} {ratio:.3f}", flush=True)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
