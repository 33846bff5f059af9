"""The text task's test material: a tiny word-level Llama folder (model + tokenizer, made
from a config, no hub) and a reward-function file in TRL's contract."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REWARDS = '''
def words(prompts, completions, answer, **kw):
    """The share of the completion's words that are the answer word (a shaped reward)."""
    return [sum(w == a for w in c.split()) / 4 for c, a in zip(completions, answer)]

def length(prompts, completions, **kw):
    """The completion's word count over 4: varies whenever EOS ends completions apart."""
    return [len(c.split()) / 4 for c in completions]

def boom(prompts, completions, **kw):
    raise ValueError("the grader is down")

CALLS = []

def later(prompts, completions, **kw):
    """Fine on the checks (2 completions) and the first step; raises on the second step."""
    if len(completions) > 2:
        CALLS.append(1)
        if len(CALLS) == 2:
            raise RuntimeError("the grader went away")
    return [float(len(c)) for c in completions]
'''


def word_llama_folder(folder: str, dtype: torch.dtype = torch.float32) -> str:
    """A 2-layer Llama (64 words, context 64) with a WordLevel tokenizer over `w0 .. w59`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(60)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(dtype).eval().save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)
    return folder


def text_task_folder(root: Path, rows: list[dict]) -> str:
    """`root/llama` (`word_llama_folder`), `root/data.jsonl` with `rows` and
    `root/my_rewards.py` (`REWARDS`); returns the model folder."""
    model = word_llama_folder(str(root / "llama"))
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "my_rewards.py").write_text(REWARDS)
    return model
