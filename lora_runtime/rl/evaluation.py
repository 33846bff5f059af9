"""Greedy evaluation of an actor on held-out seeds: success rate and mean return.

The seeds are `HELD_OUT_SEED, HELD_OUT_SEED + 1, ...`; training and warm-start episodes draw
their seeds below `TRAIN_SEED_LIMIT` (= `HELD_OUT_SEED`), so an evaluation never replays a
training layout.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_runtime.rl.episodes import EpisodeLogitsFn, ModelPolicy, held_out_seeds, run_episodes
from lora_runtime.rl.tasks.episodic import EpisodicTask

__all__ = ["evaluate"]


def evaluate(model: nn.Module, logits_fn: EpisodeLogitsFn, task: EpisodicTask, episodes: int,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Greedy success rate, mean return and mean length over `episodes` held-out seeds.

    Args:
        model: the actor (left in eval mode).
        logits_fn: `(model, ObsBatch) -> [N, vocab]`.
        task: the environments.
        episodes: how many held-out seeds (the first `episodes` of them).
        device: where the model runs.

    Returns:
        `{"success_rate", "reward_mean", "episode_len", "episodes", "first_seed", ...}`.
    """
    model.eval()
    seeds = held_out_seeds(episodes)
    with torch.no_grad():
        result = run_episodes(task, seeds, ModelPolicy(model, logits_fn, task, 1.0, None, greedy=True, device=device),
                              record=False)
    return {**result.stats(), "episodes": episodes, "first_seed": seeds[0]}
