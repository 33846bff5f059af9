"""The built-in actor's base weights: a seeded init plus a short supervised warm start.

A VLA is fine-tuned from a vision-language model that already grounds words in images.
The built-in base plays that part: from its seeded random init it is trained, by plain
next-token cross-entropy, to answer `[BOS, WHERE, <colour>]` with the object's row and
column as *number words*. It never emits action tokens, so on the RL task
(`[BOS, GO, <colour>]` -> two action tokens) it starts at chance reward; what RL has to
learn is to act: map what the base knows onto the action tokens.

While pretraining, the row word fed back before the column is replaced by a random token
half of the time, so the column does not depend on which token precedes it (the RL
actor feeds back an action token there). Finally the `lm_head` rows of the action tokens
are zeroed, as for tokens a model has never produced: every action token then gets the
same logit, so the first policy is exactly uniform over the board and its expected reward
is exactly chance, `1 / grid**2`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lora_runtime.rl.models import TinyVLA
from lora_runtime.rl.seeding import base_seeds
from lora_runtime.rl.supervised import fit

ReachTask = Any  # `lora_runtime.rl.tasks.reach.ReachTask` (which imports this module)

TOKEN_NOISE = 0.5
WARMUP_STEPS = 50


@dataclass(frozen=True)
class PretrainReport:
    """How the warm start ended (stored in the base's `config.json`)."""

    steps: int
    final_loss: float
    accuracy: float  # both number words right, greedy, on fresh scenes

    def as_dict(self) -> dict[str, float]:
        return {"steps": self.steps, "final_loss": round(self.final_loss, 5), "accuracy": round(self.accuracy, 5)}


def where_batch(
    task: ReachTask, n: int, generator: torch.Generator, token_noise: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(pixel_values [n,3,H,W], input_ids [n,4], answers [n,2])` for "where is <colour>?"."""
    t = task.tokens
    scenes = task.sample(n, generator)
    prompt = scenes.prompt_ids.clone()  # [n, 3]
    prompt[:, 1] = t.where
    answers = torch.tensor(t.numbers)[scenes.target]  # [n, 2] row word, column word
    fed = answers[:, :1].clone()  # [n, 1] teacher-forced row word ...
    noisy = torch.rand(n, generator=generator) < token_noise
    fed[noisy, 0] = torch.randint(0, t.vocab_size, (int(noisy.sum()),), generator=generator)  # ... or noise
    return scenes.pixel_values, torch.cat([prompt, fed], dim=1), answers


def pretrain_base(
    model: TinyVLA,
    task: ReachTask,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> PretrainReport:
    """Supervised warm start of the built-in actor, in place, deterministic given `seed`.

    Args:
        model: the freshly initialised actor (all parameters train).
        task: scenes and the token layout.
        steps: optimizer steps (AdamW, linear warm-up then cosine decay).
        batch_size: scenes per step.
        lr: peak learning rate.
        seed: `actor.builtin.seed`; the scene generator uses its warm-start seed (`base_seeds`).
        on_step: called as `on_step(step, loss)` after each step (progress display).

    Returns:
        The final loss and greedy accuracy on 512 fresh scenes.
    """
    gen = torch.Generator().manual_seed(base_seeds(seed)[1])

    def loss_at(step: int) -> torch.Tensor:
        pixels, ids, answers = where_batch(task, batch_size, gen, TOKEN_NOISE)
        logits = model(pixels, ids)[:, -2:]  # [B, 2, V]: predictions of row and column words
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), answers.reshape(-1))

    loss_value = fit(model, steps, lr, WARMUP_STEPS, loss_at, on_step)
    model.eval()
    with torch.no_grad():
        pixels, ids, answers = where_batch(task, 512, gen, 0.0)
        pred = model(pixels, ids)[:, -2:].argmax(dim=-1)  # [512, 2]
        accuracy = (pred == answers).all(dim=1).float().mean().item()
    return PretrainReport(steps, loss_value, accuracy)


@torch.no_grad()
def clear_action_rows(model: TinyVLA, task: ReachTask) -> None:
    """Zeroes the `lm_head` rows of the action tokens: the policy starts uniform."""
    model.language_model.lm_head.weight[list(task.tokens.actions)] = 0.0
