"""GRPO pieces as plain functions: sample actions, score, group advantages, clipped loss.

The trainer strings them together; a distributed trainer can reuse them unchanged. Every
function takes a `logits_fn(model, scenes, input_ids, image_repeats) -> [N, T, vocab]`
(see `lora_runtime.rl.actor_setup.logits_fn_for`), so the same code drives the built-in actor and a
text-only transformers model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lora_runtime.rl.tasks.reach import ReachTask, Scenes

LogitsFn = Callable[[nn.Module, Scenes, torch.Tensor, int], torch.Tensor]


@dataclass
class Rollout:
    """One step's experience: `B` scenes x `G` samples each, `A` action tokens per sample."""

    scenes: Scenes  # B scenes, on the model's device
    input_ids: torch.Tensor  # [B*G, 3 + A - 1] prompt + all but the last action token
    action_bins: torch.Tensor  # [B*G, A] in [0, grid)
    old_logp: torch.Tensor  # [B*G, A] log-probs under the sampling policy
    rewards: torch.Tensor  # [B*G]
    advantages: torch.Tensor  # [B*G]
    group_size: int


def action_log_probs(
    logits: torch.Tensor, action_ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probabilities over the action tokens only (the policy never emits other tokens).

    Args:
        logits: `[..., vocab]`.
        action_ids: `[K]` vocabulary ids of the action bins.
        temperature: softmax temperature.

    Returns:
        `[..., K]` float32 log-probabilities.
    """
    return torch.log_softmax(logits.index_select(-1, action_ids).float() / temperature, dim=-1)


@torch.no_grad()
def sample_actions(
    model: nn.Module,
    logits_fn: LogitsFn,
    scenes: Scenes,
    action_ids: torch.Tensor,
    num_actions: int,
    group_size: int,
    temperature: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples `group_size` action sequences per scene, one token at a time.

    Gumbel noise comes from `generator` (a CPU generator), so a run is reproducible on any
    device and its sampling state can be saved and restored exactly.

    Returns:
        `(input_ids [B*G, 3 + A - 1], bins [B*G, A], log_probs [B*G, A])`.
    """
    ids = scenes.prompt_ids.repeat_interleave(group_size, dim=0)  # [B*G, 3]
    bins, logps = [], []
    for i in range(num_actions):
        logp = action_log_probs(logits_fn(model, scenes, ids, group_size)[:, -1], action_ids, temperature)
        u = torch.rand(logp.shape, generator=generator).clamp_(1e-9, 1.0 - 1e-9).to(logp.device)
        choice = (logp - torch.log(-torch.log(u))).argmax(dim=-1)  # [B*G] Gumbel-max sample
        bins.append(choice)
        logps.append(logp.gather(-1, choice[:, None])[:, 0])
        if i + 1 < num_actions:
            ids = torch.cat([ids, action_ids[choice][:, None]], dim=1)  # [B*G, T + 1]
    return ids, torch.stack(bins, dim=1), torch.stack(logps, dim=1)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, over the group's std.

    Args:
        rewards: `[B*G]`, groups contiguous.
        group_size: G.

    Returns:
        `[B*G]`; zero for a group whose rewards are all equal.
    """
    r = rewards.view(-1, group_size)  # [B, G]
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def collect_rollout(
    model: nn.Module,
    logits_fn: LogitsFn,
    task: ReachTask,
    scenes: Scenes,
    action_ids: torch.Tensor,
    group_size: int,
    temperature: float,
    generator: torch.Generator,
) -> Rollout:
    """Samples actions for `scenes`, scores them, computes group advantages."""
    ids, bins, logp = sample_actions(
        model, logits_fn, scenes, action_ids, task.num_actions, group_size, temperature, generator
    )
    rewards = task.reward(scenes, bins)
    return Rollout(scenes, ids, bins, logp, rewards, group_advantages(rewards, group_size), group_size)


def policy_log_probs(
    model: nn.Module, logits_fn: LogitsFn, rollout: Rollout, action_ids: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-scores the rollout's actions with `model` (differentiable).

    Returns:
        `(log_probs [B*G, A] of the taken actions, full action distributions [B*G, A, K])`.
    """
    a = rollout.action_bins.shape[1]
    logits = logits_fn(model, rollout.scenes, rollout.input_ids, rollout.group_size)[:, -a:]  # [N, A, V]
    dist = action_log_probs(logits, action_ids, temperature)  # [N, A, K]
    return dist.gather(-1, rollout.action_bins[..., None])[..., 0], dist


def kl_divergence(logp_dist: torch.Tensor, ref_dist: torch.Tensor) -> torch.Tensor:
    """Exact `KL(policy || reference)` per action token over the K action bins.

    Args:
        logp_dist, ref_dist: `[N, A, K]` log-probabilities.

    Returns:
        `[N, A]`, >= 0.
    """
    return (logp_dist.exp() * (logp_dist - ref_dist)).sum(dim=-1)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    kl: torch.Tensor,
    clip_eps: float,
    kl_coef: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate plus a KL penalty, averaged over samples and action tokens.

    Args:
        logp: `[N, A]` current log-probs of the taken actions (with grad).
        old_logp: `[N, A]` log-probs when sampled.
        advantages: `[N]`.
        kl: `[N, A]` KL to the reference policy (with grad).
        clip_eps: ratio clip range `[1 - eps, 1 + eps]`.
        kl_coef: weight of the KL term.

    Returns:
        `(loss, {"pg_loss", "kl", "clip_frac"})`.
    """
    ratio = torch.exp(logp - old_logp)  # [N, A]
    adv = advantages[:, None]  # [N, 1]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)
    pg_loss = -surrogate.mean()
    kl_mean = kl.mean()
    loss = pg_loss + kl_coef * kl_mean
    clip_frac = ((ratio - 1.0).abs() > clip_eps).float().mean()
    return loss, {"pg_loss": pg_loss.item(), "kl": kl_mean.item(), "clip_frac": clip_frac.item()}
