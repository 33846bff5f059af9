"""A step's metrics over torchrun ranks: what adds up, what is a mean over episodes, what is averaged."""

from __future__ import annotations

import math

from lora_runtime import parallel

__all__ = ["reduce_step_stats"]

EPISODE_MEANS = ("success_rate", "reward_mean", "episode_len")  # means over a step's finished episodes
SUMMED = ("episodes", "completions", "env_steps", "samples_per_s", "env_steps_per_s")  # every rank's share adds up


def reduce_step_stats(stats: dict[str, float]) -> dict[str, float]:
    """A step's metrics over all ranks (unchanged in one process): counts and rates summed,
    per-episode means weighted by each rank's finished episodes (a rank whose rollout ended
    no episode counts for nothing, rather than making the mean NaN), the rest averaged."""
    if parallel.get_world_size() == 1:
        return parallel.reduce_metrics(stats)
    n = stats.get("episodes", 1.0)
    weighted = {k: 0.0 if n == 0 or math.isnan(stats[k]) else stats[k] * n for k in EPISODE_MEANS if k in stats}
    summed = parallel.reduce_metrics({**weighted, **{k: stats[k] for k in SUMMED if k in stats}}, "sum")
    out = parallel.reduce_metrics({k: v for k, v in stats.items() if k not in weighted and k not in SUMMED})
    episodes = summed.get("episodes", float(parallel.get_world_size()))
    for k in weighted:
        out[k] = summed[k] / episodes if episodes else float("nan")
    return {**out, **{k: summed[k] for k in SUMMED if k in summed}}
