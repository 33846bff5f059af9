"""One GRPO step on a multi-step task: seed-grouped episodes, episode-return advantages.

`batch_size` training seeds are drawn from the trainer's generator; each is played
`group_size` times (same layout and mission, different sampled actions) with the actor
under `no_grad`. An episode's advantage is its return minus its group's mean, over the
group's std (`grpo.group_advantages`); every step of the episode shares it. The loss is the
clipped-ratio surrogate plus `kl_coef` times the exact KL over the action tokens to the
reference policy (adapters disabled, or the frozen copy in full mode), averaged over the
steps of the episodes whose advantage is not zero. Each of `update_epochs` epochs takes one
optimizer step per minibatch (`trainer.minibatches`, default 1: one step over all kept
steps; more: a fresh random split each epoch, PPO-style), each computed in chunks of
`MINIBATCH` steps whose gradients add up. A group whose episodes all returned the same (all failed, say: the longest
episodes) has zero advantage and is left out of the update, as in DAPO's dynamic sampling
(Yu et al. 2025, arXiv:2503.14476, which drops such groups); a step where every group is
like that makes no update.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from lora_runtime.config import TrainerConfig
from lora_runtime.parallel import share_size
from lora_runtime.rl import grpo
from lora_runtime.rl.episodes import (
    EpisodeLogitsFn,
    Episodes,
    ModelPolicy,
    draw_seeds,
    run_episodes,
)
from lora_runtime.rl.tasks.episodic import EpisodicTask

__all__ = ["MINIBATCH", "collect_groups", "episode_advantages", "episode_step", "minibatch_indices"]

MINIBATCH = 512  # recorded steps per forward/backward pass


def collect_groups(model: nn.Module, logits_fn: EpisodeLogitsFn, task: EpisodicTask, num_seeds: int, group_size: int,
                   temperature: float, generator: torch.Generator, device: torch.device | str = "cpu") -> Episodes:
    """`num_seeds` seeds from `generator`, each played `group_size` times (groups contiguous).

    Reproducible: the same generator state gives the same seeds, actions and returns.
    """
    seeds = [s for s in draw_seeds(generator, num_seeds) for _ in range(group_size)]
    model.eval()
    with torch.no_grad():
        return run_episodes(task, seeds, ModelPolicy(model, logits_fn, task, temperature, generator, False, device))


def episode_advantages(returns: torch.Tensor, episode: torch.Tensor, group_size: int) -> torch.Tensor:
    """`[S]` per-step advantages: the group-relative advantage of each step's episode.

    Args:
        returns: `[E]` episode returns, groups of `group_size` contiguous.
        episode: `[S]` the episode index of each recorded step.
    """
    return grpo.group_advantages(returns, group_size)[episode]


def minibatch_indices(total: int, minibatches: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The kept steps `0..total-1` split into `minibatches` near-equal index sets `[n_i]`.

    One minibatch is every step in order (no random draw: the update of `minibatches: 1`).
    More are a fresh permutation from `generator` (so a run stays reproducible and resumes
    exactly), cut into `min(minibatches, total)` parts, as in PPO's minibatch SGD (Schulman
    et al. 2017, arXiv:1707.06347, Algorithm 1).
    """
    if minibatches == 1:
        return [torch.arange(total)]
    return list(torch.randperm(total, generator=generator).tensor_split(min(minibatches, total)))


def episode_step(model: nn.Module, forward_model: nn.Module, logits_fn: EpisodeLogitsFn, reference,
                 optimizer: torch.optim.Optimizer, task: EpisodicTask, cfg: TrainerConfig,
                 generator: torch.Generator, device: torch.device) -> dict[str, float]:
    """One GRPO step over whole episodes; returns its metrics (see `metrics.jsonl`)."""
    start = time.perf_counter()
    eps = collect_groups(forward_model, logits_fn, task, share_size(cfg.batch_size), cfg.group_size, cfg.temperature,
                         generator, device)
    train_start = time.perf_counter()
    adv = episode_advantages(eps.returns, eps.episode, cfg.group_size)  # [S]
    keep = adv.ne(0).nonzero()[:, 0]  # [S'] steps of groups whose returns differ (the others carry no signal)
    adv, actions, old_logp = adv[keep].to(device), eps.actions[keep].to(device), eps.logp[keep].to(device)
    obs = eps.obs.select(keep)
    action_ids = task.action_ids.to(device)
    total = len(actions)

    def dist_of(m: nn.Module, part: slice | torch.Tensor) -> torch.Tensor:  # [n, K] log-probs over the action tokens
        return grpo.action_log_probs(logits_fn(m, obs.select(part).to(device)), action_ids, cfg.temperature)

    chunks = [slice(i, i + MINIBATCH) for i in range(0, total, MINIBATCH)]
    ref = [reference.apply(lambda m, p=p: dist_of(m, p)) for p in chunks]  # each [n, K], computed once per step
    ref = torch.cat(ref) if ref else None  # [S', K]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    sums = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0}
    grad_norm = torch.zeros(())
    for _ in range(cfg.update_epochs if total else 0):
        sums = dict.fromkeys(sums, 0.0)  # the metrics are the last epoch's means over all kept steps
        for batch in minibatch_indices(total, cfg.minibatches, generator):  # one optimizer step each
            optimizer.zero_grad(set_to_none=True)
            for part in batch.split(MINIBATCH):  # [n] step indices; gradients add up over the parts
                dist = dist_of(forward_model, part)  # [n, K]
                logp = dist.gather(-1, actions[part][:, None])  # [n, 1]
                kl = grpo.kl_divergence(dist[:, None], ref[part][:, None])  # [n, 1]
                loss, stats = grpo.grpo_loss(logp, old_logp[part][:, None], adv[part], kl, cfg.clip_eps, cfg.kl_coef)
                (loss * (len(part) / len(batch))).backward()
                entropy = -(dist.detach().exp() * dist.detach()).sum(-1).mean()
                for key, value in (("loss", loss.item()), ("entropy", entropy.item()), *stats.items()):
                    sums[key] += value * len(part) / total
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    now = time.perf_counter()
    elapsed = now - start
    record = eps.stats()
    return {
        **record,
        "reward_std": eps.returns.std().item(),
        **sums,
        "grad_norm": grad_norm.item(),
        "trained_steps": total,
        "train_s": now - train_start,
        "step_time_s": elapsed,
        "samples_per_s": record["env_steps"] / elapsed,
    }
