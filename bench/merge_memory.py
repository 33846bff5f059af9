"""Peak resident memory that one `merged()` enter + leave adds, on a model with a large lm_head.

A 2-layer Llama (hidden 1024, intermediate 2816, vocabulary 32000, untied `lm_head`: a float32
`[32000, 1024]` weight of 125 MiB), `prepare_actor` with its defaults (r = 32 on the seven
projections and `lm_head`) and random non-zero `lora_B`. The process's peak RSS is read before
and after `with merged(model): pass`; what it adds is what the merge holds for the exact
restore (`MergeStats.extra_bytes`, printed beside it) plus its transient buffers.

    .venv/bin/python bench/merge_memory.py      # a few seconds
"""

from __future__ import annotations

import resource

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lora_runtime
from lora_runtime import ActorModelConfig, merged, prepare_actor


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=32000,
                      tie_word_embeddings=False)
    model = prepare_actor(LlamaForCausalLM(cfg).eval(), ActorModelConfig(is_lora=True), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_runtime.iter_lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.02)
        model(torch.randint(0, cfg.vocab_size, (1, 16)))  # allocator warm
    before = peak_rss_mib()
    with merged(model) as stats:
        pass
    after = peak_rss_mib()
    print(f"extension loaded: {lora_runtime.extension_loaded()}")
    print(f"peak RSS {before:.0f} -> {after:.0f} MiB: merged() added {after - before:.0f} MiB; "
          f"held for the exact restore {stats.extra_bytes / 2**20:.0f} MiB; "
          f"the largest weight (lm_head, float32) {cfg.vocab_size * cfg.hidden_size * 4 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
