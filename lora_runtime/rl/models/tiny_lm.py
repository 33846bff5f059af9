"""The built-in language model: a tiny Llama (transformers) with a character tokenizer.

With `task.kind: text` and `actor.model.model_path: null` the actor is this model, built
from the sizes of `actor.builtin` (`text_dim`, `text_layers`, `text_heads`,
`text_mlp_dim`, `max_text_len` as the context) and seeded with `actor.builtin.seed`. Its
vocabulary is fixed: `<pad> <s> </s> <unk>`, the digits, `+ - * = ` and space, and the
lower-case letters, one token per character (`tokenizers` WordLevel over single
characters). It is a plain `LlamaForCausalLM`, so the causal-LM family reads it, saves it
with `save_pretrained` (its tokenizer beside it) and TRL can train it.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_runtime.config import BuiltinActorConfig, ConfigError
from lora_runtime.rl.models.causal_lm import BUILTIN_TOKENIZER

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = tuple("0123456789+-*= ") + tuple("abcdefghijklmnopqrstuvwxyz")
VOCAB = SPECIALS + CHARS


def char_tokenizer():
    """A `PreTrainedTokenizerFast`: one token per character of `CHARS`, left padding."""
    try:
        from tokenizers import (  # deferred: optional dependency
            Tokenizer,
            decoders,
            models,
            pre_tokenizers,
        )
        from transformers import PreTrainedTokenizerFast  # deferred: optional dependency
    except ImportError:
        raise ConfigError("task.kind: text with the built-in model needs transformers and tokenizers; "
                          "pip install 'lora-runtime[hf]'") from None
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")


def build_tiny_lm(cfg: BuiltinActorConfig) -> nn.Module:
    """The built-in tiny Llama with deterministic weights (seed `cfg.seed`) and its tokenizer
    attached (saved with it). The global RNG is left as it was."""
    from transformers import (  # deferred: optional dependency
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=cfg.text_dim, intermediate_size=cfg.text_mlp_dim,
                         num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                         num_key_value_heads=cfg.text_heads, max_position_embeddings=cfg.max_text_len,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    setattr(model, BUILTIN_TOKENIZER, char_tokenizer())
    return model
