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


def masked_mean(x: torch.Tensor, mask: torch.Tensor, loss_type: str,
                tokens_per_row: torch.Tensor | float | None = None) -> torch.Tensor:
    """The mean of per-token terms `x [N, A]` over the tokens of `mask [N, A]`.

    - "sequence_mean": `1/N sum_i 1/|o_i| sum_t x_it` (GRPO, Shao et al. 2024,
      arXiv:2402.03300, eq. 3);
    - "token_mean": `sum_it x_it / sum_i |o_i|` (DAPO, Yu et al. 2025, arXiv:2503.14476,
      eq. 12), the divisor `N * tokens_per_row` when given;
    - "dr_grpo": `1/N sum_i 1/A sum_t x_it`, a constant length (Dr. GRPO, Liu et al. 2025,
      arXiv:2503.20783, sec. 3.1).
    """
    summed = (x * mask).sum(-1)  # [N]
    if loss_type == "sequence_mean":
        return (summed / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "token_mean":
        per_row = mask.sum() / len(mask) if tokens_per_row is None else tokens_per_row
        return summed.sum() / torch.as_tensor(len(mask) * per_row, dtype=summed.dtype).clamp(min=1)
    if loss_type == "dr_grpo":
        return (summed / mask.shape[-1]).mean()
    raise ValueError(f"loss_type={loss_type!r}: expected sequence_mean, token_mean or dr_grpo")


def episode_weights(episode: torch.Tensor, loss_type: str) -> torch.Tensor | None:
    """`[N]` weights of rows that are steps of multi-step rollouts, so that the mean of the
    weighted per-row terms is `loss_type`'s mean over the rollouts (as `masked_mean` is over
    tokens): with `E` rollouts among the `N` rows and `L_e` rows in rollout `e`,

    - "sequence_mean": `w = (N / E) / L_e`: every rollout counts alike, however long;
    - "token_mean": None (every step alike, the plain row mean);
    - "dr_grpo": `w = (N / E) / max_e L_e`.

    Without the weights a long episode counts `L_e` times: with group-relative advantages
    (which sum to zero over a group) a group whose failed or slow episodes are the longest
    then pushes down more taken actions than it pushes up, and the policy's entropy rises
    (measured on BabyAI-GoToObj: 0.51 -> 0.72 over 30 steps, with sampled success falling).

    Args:
        episode: `[N]` long, the rollout of each row.
        loss_type: as `masked_mean`.

    Returns:
        `[N]` float32 weights, or None where they would all be 1 (one row per rollout, or token_mean).
    """
    if loss_type not in ("sequence_mean", "token_mean", "dr_grpo"):
        raise ValueError(f"loss_type={loss_type!r}: expected sequence_mean, token_mean or dr_grpo")
    if loss_type == "token_mean" or len(episode) == 0:
        return None
    _, index, lengths = torch.unique(episode, return_inverse=True, return_counts=True)  # [N], [E]
    if bool((lengths == 1).all()):
        return None
    scale = len(episode) / len(lengths)
    if loss_type == "sequence_mean":
        return (scale / lengths.float())[index]  # [N]
    return torch.full((len(episode),), scale / float(lengths.max()))


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    kl: torch.Tensor,
    clip_eps: float,
    kl_coef: float,
    mask: torch.Tensor | None = None,
    loss_type: str = "sequence_mean",
    tokens_per_row: torch.Tensor | float | None = None,
    row_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate plus a KL penalty, averaged over samples and action tokens.

    With a `mask` (sequences of different lengths) the per-token terms are averaged as
    `loss_type` says (`masked_mean`); without one, over all `N * A` entries.

    Args:
        logp: `[N, A]` current log-probs of the taken actions (with grad).
        old_logp: `[N, A]` log-probs when sampled.
        advantages: `[N]`.
        kl: `[N, A]` KL to the reference policy (with grad).
        clip_eps: ratio clip range `[1 - eps, 1 + eps]`.
        kl_coef: weight of the KL term.
        mask: `[N, A]` 1 for the tokens that count, or None.
        loss_type: "sequence_mean", "token_mean" or "dr_grpo" (see `masked_mean`).
        tokens_per_row: token_mean's divisor per row (the batch's tokens / rows); None:
            this batch's own.
        row_weights: `[N]` weights of the rows' terms (`episode_weights`: rows that are
            steps of longer rollouts), or None (all 1).

    Returns:
        `(loss, {"pg_loss", "kl", "clip_frac"})`.
    """
    ratio = torch.exp(logp - old_logp)  # [N, A]
    adv = advantages[:, None]  # [N, 1]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)
    if row_weights is not None:
        surrogate, kl = surrogate * row_weights[:, None], kl * row_weights[:, None]
    if mask is None:
        pg_loss = -surrogate.mean()
        kl_mean = kl.mean()
        clip_frac = ((ratio - 1.0).abs() > clip_eps).float().mean()
    else:
        pg_loss = -masked_mean(surrogate, mask, loss_type, tokens_per_row)
        kl_mean = masked_mean(kl.expand_as(mask), mask, loss_type, tokens_per_row)
        clip_frac = (((ratio - 1.0).abs() > clip_eps).float() * mask).sum() / mask.sum().clamp(min=1)
    loss = pg_loss + kl_coef * kl_mean
    return loss, {"pg_loss": pg_loss.item(), "kl": kl_mean.item(), "clip_frac": clip_frac.item()}
