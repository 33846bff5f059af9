"""Tiny transformers model folders built from configs, as a user's checkpoint would look:
`config.json`, `model.safetensors`, `generation_config.json` and a tokenizer with a chat
template (a `tokenizers` WordLevel model saved with `PreTrainedTokenizerFast`). No hub."""

from __future__ import annotations

import os

import torch
from torch import nn

from lora_runtime.adapters import apply_lora, iter_lora_layers
from lora_runtime.config import DEFAULT_TARGETS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 64
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
SIZES = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def make_tokenizer(vocab_size: int = VOCAB, extra: tuple[str, ...] = ()):
    """A WordLevel tokenizer over <unk>/<s>/</s>/<pad>, `extra`, then `w0 .. wN`, with a
    chat template (`PreTrainedTokenizerFast`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", *extra]
    words = specials + [f"w{i}" for i in range(vocab_size - len(specials))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(folder: str, vocab_size: int = VOCAB) -> None:
    """Writes `make_tokenizer(vocab_size)` to `folder`."""
    make_tokenizer(vocab_size).save_pretrained(folder)


IMAGE_TOKEN = 4  # "<image>" in the LLaVA folder's tokenizer
IMAGE_SIZE, PATCH = 16, 8  # 4 patches: 4 image tokens per image


def llava_folder(folder: str, seed: int = 0) -> str:
    """Writes a tiny LLaVA (CLIP vision tower, 2-layer Llama) with a processor (CLIP image
    processor + tokenizer with an `<image>` token + chat template)."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**SIZES), image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-1)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=images, tokenizer=make_tokenizer(extra=("<image>",)), patch_size=PATCH,
                               vision_feature_select_strategy="default", image_token="<image>")
    processor.save_pretrained(folder)
    return folder


def causal_lm_folder(folder: str, kind: str = "llama", dtype: torch.dtype = torch.float32,
                     tie: bool = False, seed: int = 0) -> str:
    """Writes a 2-layer Llama or Qwen2 causal LM (random weights, `seed`) in `dtype`."""
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    config = config_cls(**SIZES, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3, max_new_tokens=7)
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def randomize_adapters(model: nn.Module, seed: int = 1, std: float = 0.05) -> nn.Module:
    """Non-zero lora_B (and a fresh lora_A) in every LoRA layer, so the LoRA path counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in iter_lora_layers(model):
            for w in (layer.lora_A.weight, layer.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=g) * std)
    return model


def patched(model: nn.Module, rank: int = 4, seed: int = 1) -> nn.Module:
    """`model` with rank-`rank` adapters on the default targets (lm_head included), non-zero."""
    apply_lora(model, rank, alpha=2 * rank, target_modules=list(DEFAULT_TARGETS))
    return randomize_adapters(model, seed)


def token_batch(seed: int = 2, batch: int = 2, length: int = 9) -> torch.Tensor:
    """`[batch, length]` token ids."""
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """`[B, T, V]` logits, no grad."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits
