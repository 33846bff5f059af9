"""GRPO's math as plain functions of tensors: group advantages, KL, the clipped loss.

Group Relative Policy Optimization (Shao et al. 2024, arXiv:2402.03300): each seed (scene,
level, prompt) is played `G` times; a rollout's advantage is its return minus its group's
mean over the group's std; the loss is PPO's clipped-ratio surrogate (Schulman et al. 2017,
arXiv:1707.06347) plus a KL penalty to the reference policy.
"""

from __future__ import annotations

import torch


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


def kl_divergence(logp_dist: torch.Tensor, ref_dist: torch.Tensor) -> torch.Tensor:
    """Exact `KL(policy || reference)` per action token over the K action tokens.

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
