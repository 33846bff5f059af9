"""The models of the model-level benchmark: how to build each, its batch, its loss.

- `tiny-llama`: `LlamaForCausalLM` from a transformers config (hidden 512, intermediate
  1376, 4 layers, 8 heads, vocab 8000), batch 4 x 128 tokens; built offline, never
  downloaded.
- `actor`: the built-in vision-language-action actor (`lora_runtime.rl.models.vla`) at a
  comparable size (text width 512, 4 layers, vocab 8000; a 2-layer ViT over 64 patches),
  batch 4 images x 128 text tokens.
- `tiny-llama-smoke` / `actor-smoke`: the same code at toy sizes, for the smoke test.

A spec's `loss_input_grad` is the frozen base's train step: no parameter requires grad,
the input (embeddings, or the image) does, so the backward still runs through every layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lora_runtime.adapters import DEFAULT_TARGETS, find_targets
from lora_runtime.adapters.targets import matches_target
from lora_runtime.config import BuiltinActorConfig
from lora_runtime.rl.models.vla import build_tiny_vla

__all__ = ["MODEL_SPECS", "ModelSpec", "get_spec", "present_targets"]

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """How to build and run one benchmark model.

    Attributes:
        name: the spec's name on the command line.
        description: sizes, for the table and the JSON.
        build: returns the base model (float32, deterministic weights, on CPU).
        batch: `(device, generator) -> inputs`.
        loss: `(model, batch) -> scalar loss` (a train step's forward).
        loss_input_grad: the frozen base's forward: the input requires grad.
        rollout: `(model, batch) -> logits`, called under `torch.no_grad()`.
        sizes: the sizes, recorded in the JSON.
        rank: the adapter rank both runtimes use (alpha = rank).
    """

    name: str
    description: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.device, torch.Generator], Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    loss_input_grad: Callable[[nn.Module, Batch], torch.Tensor]
    rollout: Callable[[nn.Module, Batch], torch.Tensor]
    sizes: dict = field(default_factory=dict)
    rank: int = 32


def present_targets(model: nn.Module) -> list[str]:
    """The default target names that match at least one `nn.Linear` of `model`, in the
    order of `DEFAULT_TARGETS` (what both runtimes are given)."""
    found = [path for path, _ in find_targets(model, DEFAULT_TARGETS)]
    return [t for t in DEFAULT_TARGETS if any(matches_target(p, [t]) for p in found)]


# ----------------------------------------------------------------------------- tiny Llama

LLAMA_BLOCK_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_tiny_llama(hidden: int, inter: int, layers: int, heads: int, vocab: int,
                     max_positions: int = 2048) -> nn.Module:
    """A float32 `LlamaForCausalLM` from a config (no hub), weights drawn from seed 0."""
    from transformers import LlamaConfig, LlamaForCausalLM  # deferred: transformers is optional

    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
        max_position_embeddings=max_positions, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float()


def _llama_spec(name: str, hidden: int, inter: int, layers: int, heads: int, vocab: int,
                batch: int, seq: int, rank: int = 32, dtype: torch.dtype = torch.float32) -> ModelSpec:
    sizes = {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
             "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": vocab,
             "batch": batch, "seq_len": seq, "dtype": str(dtype).removeprefix("torch.")}

    def build() -> nn.Module:
        return build_tiny_llama(hidden, inter, layers, heads, vocab, max(seq, 128)).to(dtype).eval()

    def make_batch(device: torch.device, gen: torch.Generator) -> Batch:
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)  # [B, T]
        return {"input_ids": ids.to(device)}

    def loss(model: nn.Module, b: Batch) -> torch.Tensor:
        return model(input_ids=b["input_ids"], labels=b["input_ids"], use_cache=False).loss

    def loss_input_grad(model: nn.Module, b: Batch) -> torch.Tensor:
        with torch.no_grad():
            embeds = model.get_input_embeddings()(b["input_ids"])  # [B, T, D]
        embeds.requires_grad_(True)
        return model(inputs_embeds=embeds, labels=b["input_ids"], use_cache=False).loss

    def rollout(model: nn.Module, b: Batch) -> torch.Tensor:
        return model(input_ids=b["input_ids"], use_cache=False).logits  # [B, T, V]

    desc = (f"LlamaForCausalLM hidden {hidden}, intermediate {inter}, {layers} layers, "
            f"{heads} heads, vocab {vocab}; batch {batch} x {seq} tokens"
            + ("" if dtype == torch.float32 else f"; {sizes['dtype']} weights"))
    return ModelSpec(name, desc, build, make_batch, loss, loss_input_grad, rollout, sizes, rank)


# ----------------------------------------------------------------------------- built-in actor


def _actor_spec(name: str, batch: int, seq: int, rank: int = 32, **sizes: int) -> ModelSpec:
    def cfg():
        return BuiltinActorConfig(max_text_len=seq, **sizes)

    def build() -> nn.Module:
        return build_tiny_vla(cfg()).float().eval()

    def make_batch(device: torch.device, gen: torch.Generator) -> Batch:
        c = cfg()
        pixels = torch.rand(batch, 3, c.image_size, c.image_size, generator=gen)  # [B, 3, H, W]
        ids = torch.randint(0, c.vocab_size, (batch, seq), generator=gen)  # [B, T]
        return {"pixel_values": pixels.to(device), "input_ids": ids.to(device)}

    def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        v = logits.shape[-1]  # logits [B, T, V]: position t predicts token t + 1
        return F.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))

    def loss(model: nn.Module, b: Batch) -> torch.Tensor:
        return next_token_loss(model(b["pixel_values"], b["input_ids"]), b["input_ids"])

    def loss_input_grad(model: nn.Module, b: Batch) -> torch.Tensor:
        pixels = b["pixel_values"].detach().requires_grad_(True)
        return next_token_loss(model(pixels, b["input_ids"]), b["input_ids"])

    def rollout(model: nn.Module, b: Batch) -> torch.Tensor:
        return model(b["pixel_values"], b["input_ids"])

    desc = ("built-in actor (TinyVLA) " + ", ".join(f"{k} {v}" for k, v in sizes.items())
            + f"; batch {batch} x {seq} text tokens")
    return ModelSpec(name, desc, build, make_batch, loss, loss_input_grad, rollout,
                     {**sizes, "batch": batch, "max_text_len": seq}, rank)


_ACTOR_BENCH = {
    "image_size": 64, "patch_size": 8, "vision_dim": 256, "vision_layers": 2, "vision_heads": 4,
    "vision_mlp_dim": 1024, "pool_latents": 1, "text_dim": 512, "text_layers": 4,
    "text_heads": 8, "text_mlp_dim": 1376, "vocab_size": 8000,
}
_ACTOR_SMOKE = {
    "image_size": 8, "patch_size": 4, "vision_dim": 32, "vision_layers": 1, "vision_heads": 2,
    "vision_mlp_dim": 64, "pool_latents": 1, "text_dim": 32, "text_layers": 1,
    "text_heads": 2, "text_mlp_dim": 64, "vocab_size": 64,
}

MODEL_SPECS: dict[str, Callable[[], ModelSpec]] = {
    "tiny-llama": lambda: _llama_spec("tiny-llama", 512, 1376, 4, 8, 8000, 4, 128),
    "actor": lambda: _actor_spec("actor", 4, 128, **_ACTOR_BENCH),
    # a GPU-sized Llama in bfloat16 (about 0.5 B parameters: 1B-class widths, 8 layers), for
    # `--device cuda`; each library keeps its default adapter dtype on a bf16 base
    "llama-medium-bf16": lambda: _llama_spec("llama-medium-bf16", 2048, 5504, 8, 16, 32000, 8, 512,
                                             dtype=torch.bfloat16),
    "tiny-llama-smoke": lambda: _llama_spec("tiny-llama-smoke", 64, 128, 1, 2, 64, 2, 8, rank=4),
    "actor-smoke": lambda: _actor_spec("actor-smoke", 2, 8, rank=4, **_ACTOR_SMOKE),
}


def get_spec(name: str) -> ModelSpec:
    """The spec called `name`.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in MODEL_SPECS:
        raise ValueError(f"bench: unknown model {name!r}; allowed: {sorted(MODEL_SPECS)}")
    return MODEL_SPECS[name]()
