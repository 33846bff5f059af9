"""Tiny models built from configs (no hub) and non-zero adapters."""

from __future__ import annotations

import torch

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_tiny_llama(seed: int = 0, layers: int = 2, dtype: torch.dtype = torch.float32):
    """A 2-layer Llama (hidden 64) with random weights, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def randomize_lora(model: torch.nn.Module, std: float = 0.05, seed: int = 1) -> None:
    """Draws non-zero lora_A and lora_B so the LoRA path changes the outputs."""
    from lora_runtime.adapters import iter_lora_layers

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in iter_lora_layers(model):
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def make_patched_model(kind: str, dtype: torch.dtype = torch.float32, std: float = 0.05):
    """A patched model with non-zero adapters: the 1-layer tiny Llama ("llama"), or a model
    made only of the runtime's layers ("layers": LoRALinear -> GELU -> LoRALinear)."""
    from torch import nn

    from lora_runtime.adapters import LoRALinear, apply_lora

    if kind == "llama":
        model = apply_lora(make_tiny_llama(layers=1), 4, alpha=8)
    else:
        torch.manual_seed(0)
        model = nn.Sequential(
            LoRALinear(nn.Linear(32, 64), 4, lora_alpha=8), nn.GELU(),
            LoRALinear(nn.Linear(64, 48, bias=False), 4, lora_alpha=8),
        )
    randomize_lora(model, std=std)
    return model.to(dtype).eval()
