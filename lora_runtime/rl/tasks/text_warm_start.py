"""The text task's built-in prompt set (two-number additions) and the built-in base's warm
start on it (supervised: prompt -> answer + EOS).

The additions `a+b=` (`a, b < max_operand`) are shuffled once with a fixed seed; the first
`num_prompts` are the prompt set, of which the last `eval_fraction` are held out (the warm
start never sees them). The warm start trains the built-in tiny LM to answer part of them,
so that RL has a base that is right sometimes and a reward that tells samples apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_runtime.rl.supervised import fit

SHUFFLE_SEED = 1234  # the additions' order: fixed, so the held-out ones never change
WARMUP_STEPS = 20


def additions(num_prompts: int, max_operand: int) -> list[dict[str, Any]]:
    """`num_prompts` rows `{"prompt": "a+b=", "answer": "c"}` in a fixed shuffled order."""
    pairs = [(a, b) for a in range(max_operand) for b in range(max_operand)]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(SHUFFLE_SEED)).tolist()
    rows = [pairs[i] for i in order[:num_prompts]]
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in rows]


def split(rows: Sequence[dict[str, Any]], eval_fraction: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, held-out rows): the last `ceil(eval_fraction * n)` are held out
    (at least one when the fraction is above 0, at least one row kept for training)."""
    n = len(rows)
    held = min(n - 1, max(1 if eval_fraction > 0 else 0, round(eval_fraction * n)))
    return list(rows[: n - held]), list(rows[n - held:])


def sft_batch(tokenizer: Any, rows: Sequence[dict[str, Any]], pad_id: int,
              eos_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(ids [B, L], attention mask [B, L], labels [B, L])`: prompts left-padded (as the RL
    task feeds them), then the answer and EOS; labels -100 except on answer and EOS."""
    prompts = [tokenizer.encode(r["prompt"], add_special_tokens=False) for r in rows]
    answers = [tokenizer.encode(str(r["answer"]), add_special_tokens=False) + [eos_id] for r in rows]
    p, a = max(map(len, prompts)), max(map(len, answers))
    ids = torch.full((len(rows), p + a), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (q, ans) in enumerate(zip(prompts, answers, strict=True)):
        ids[i, p - len(q): p] = torch.tensor(q)
        ids[i, p: p + len(ans)] = torch.tensor(ans)
        mask[i, p - len(q):] = 1
        labels[i, p: p + len(ans)] = torch.tensor(ans)
    return ids, mask, labels


def pretrain_lm(model: nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]], steps: int, batch_size: int,
                lr: float, seed: int, log: Callable[[str], None]) -> float:
    """Supervised steps on `rows` (answer tokens only); returns the last loss."""
    gen = torch.Generator().manual_seed(seed)
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id

    def loss_at(step: int) -> torch.Tensor:
        pick = torch.randint(len(rows), (batch_size,), generator=gen).tolist()
        ids, mask, labels = sft_batch(tokenizer, [rows[i] for i in pick], pad_id, eos_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))

    def on_step(step: int, loss: float) -> None:
        if step % 100 == 0:
            log(f"  warm start step {step}/{steps}: loss {loss:.4f}")

    loss = fit(model, steps, lr, WARMUP_STEPS, loss_at, on_step)
    model.eval()
    return loss
