"""The warm start of the built-in actor on a multi-step task: behaviour cloning.

The adapter's scripted expert (BabyAI: minigrid's `BabyAIBot`) plays `bc_episodes` episodes
on training seeds; the actor learns its actions by cross-entropy over the action tokens at
each step, from its seeded init, for `actor.builtin.pretrain_steps` AdamW steps (linear
warm-up, cosine decay). Everything is seeded, so the same config gives the same base. Then
the warm start's greedy success on held-out seeds and the random policy's are measured and
stored with the base (`config.json`, key `pretrain`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_runtime.rl.episodes import (
    EpisodeLogitsFn,
    ExpertPolicy,
    draw_seeds,
    random_baseline,
    run_episodes,
)
from lora_runtime.rl.evaluation import evaluate
from lora_runtime.rl.tasks.episodic import EpisodicTask

WARMUP_STEPS = 20
DEMO_SEED_OFFSET = 20_000


def behaviour_clone(model: nn.Module, logits_fn: EpisodeLogitsFn, task: EpisodicTask, episodes: int, steps: int,
                    batch_size: int, lr: float, seed: int, eval_episodes: int,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains `model` in place to imitate the expert; returns the warm start's report.

    Args:
        model: the freshly initialised built-in actor (all parameters train).
        logits_fn: `(model, ObsBatch) -> [N, vocab]`.
        task: the environments; its adapter must have `expert(env)`.
        episodes: expert episodes to record.
        steps, batch_size, lr: the optimisation (AdamW).
        seed: seeds the demonstration seeds and the minibatches.
        eval_episodes: held-out episodes for the greedy success rate.
        log: progress lines.

    Returns:
        `{"demo_episodes", "demo_steps", "expert_success", "steps", "final_loss",
        "warm_start_success", "warm_start_return", "random_success", "random_return", ...}`.
    """
    gen = torch.Generator().manual_seed(DEMO_SEED_OFFSET + seed)
    demos = run_episodes(task, draw_seeds(gen, episodes), ExpertPolicy(task.adapter))
    n = len(demos.actions)
    log(f"warm start: {episodes} expert episodes, {n} steps (expert success {demos.stats()['success_rate']:.3f}); "
        f"behaviour cloning for {steps} steps")
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / WARMUP_STEPS) * 0.5 * (1.0 + math.cos(math.pi * i / max(steps, 1))))
    action_ids = task.action_ids
    model.train()
    loss_value = float("nan")
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)  # [b]
        logits = logits_fn(model, demos.obs.select(idx)).index_select(-1, action_ids)  # [b, K]
        loss = F.cross_entropy(logits.float(), demos.actions[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_value = loss.item()
    for p in params:
        p.grad = None
    warm = evaluate(model, logits_fn, task, eval_episodes)
    rand = random_baseline(task)
    log(f"warm start: loss {loss_value:.4f}; greedy held-out success {warm['success_rate']:.3f} "
        f"(return {warm['reward_mean']:.3f}); random policy {rand['success_rate']:.3f} (return {rand['reward_mean']:.3f})")
    return {
        "demo_episodes": episodes, "demo_steps": n, "expert_success": round(demos.stats()["success_rate"], 5),
        "steps": steps, "final_loss": round(loss_value, 5),
        "warm_start_success": round(warm["success_rate"], 5), "warm_start_return": round(warm["reward_mean"], 5),
        "eval_episodes": eval_episodes,
        "random_success": round(rand["success_rate"], 5), "random_return": round(rand["reward_mean"], 5),
    }
