"""PPO's math as plain functions of tensors: GAE(lambda), the clipped policy and value losses.

Proximal Policy Optimization (Schulman et al. 2017, arXiv:1707.06347) with generalized
advantage estimation (Schulman et al. 2016, arXiv:1506.02438), in the form CleanRL's
single-file PPO uses (clipped value loss, advantage normalisation per minibatch, an entropy
bonus), with one difference: an episode cut by a time limit (truncated) is bootstrapped
with the value of its last observation, while a terminated one is not (Pardo et al. 2018,
arXiv:1712.00378).
"""

from __future__ import annotations

import torch


def gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
        ended: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimates and value targets over a `[T, N]` rollout.

    Step `t` of environment `n` took its action in state `s_t` with value `values[t, n]`,
    got `rewards[t, n]`, and reached `s_{t+1}` with value `next_values[t, n]` (the final
    observation's value when the episode ended there, the next observation's otherwise).

        delta_t = r_t + gamma * V(s_{t+1}) * (1 - terminated_t) - V(s_t)
        A_t     = delta_t + gamma * lam * (1 - ended_t) * A_{t+1}

    so a terminated episode is not bootstrapped, a truncated one is (with `next_values`),
    and no advantage flows from one episode into the previous one. The last step is
    bootstrapped from `next_values[T - 1]` unless it ended.

    Args:
        rewards, values, next_values: `[T, N]` float.
        terminated: `[T, N]` bool, the episode reached a terminal state at step t.
        ended: `[T, N]` bool, the episode ended at step t (terminated or truncated).
        gamma: discount; lam: the GAE lambda.

    Returns:
        `(advantages [T, N], returns [T, N])` with `returns = advantages + values`.
    """
    not_terminal = 1.0 - terminated.to(values.dtype)
    carry = 1.0 - ended.to(values.dtype)
    deltas = rewards + gamma * next_values * not_terminal - values  # [T, N]
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[0])  # [N]
    for t in range(values.shape[0] - 1, -1, -1):
        running = deltas[t] + gamma * lam * carry[t] * running
        advantages[t] = running
    return advantages, advantages + values


def normalize(advantages: torch.Tensor, eps: float = 1e-8, moments: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> torch.Tensor:
    """`(A - mean) / (std + eps)` over the batch (a single row is returned centred at 0).

    Args:
        advantages: `[n]`.
        eps: added to the standard deviation.
        moments: `(mean, std)` to use instead of the batch's own (e.g. over every rank's rows).
    """
    if moments is not None:
        return (advantages - moments[0]) / (moments[1] + eps)
    if advantages.numel() < 2:
        return advantages - advantages.mean()
    return (advantages - advantages.mean()) / (advantages.std() + eps)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip_eps: float | None) -> torch.Tensor:
    """`0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2))`, or the plain
    `0.5 * mean((V - R)^2)` when `clip_eps` is None.

    Args:
        values: `[n]` current values (with grad); old_values: `[n]` at rollout time; returns: `[n]`.
    """
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        return 0.5 * unclipped.mean()
    clipped = (old_values + (values - old_values).clamp(-clip_eps, clip_eps) - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped).mean()


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate `-mean(min(rho A, clip(rho, 1 - eps, 1 + eps) A))`, `rho = exp(logp - old)`.

    Args:
        logp, old_logp, advantages: `[n]`.

    Returns:
        `(loss, clip_frac)`: the loss (with grad) and the share of rows whose ratio left the range.
    """
    ratio = torch.exp(logp - old_logp)  # [n]
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages)
    return -surrogate.mean(), ((ratio - 1.0).abs() > clip_eps).float().mean()


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
             old_values: torch.Tensor, returns: torch.Tensor, entropy: torch.Tensor, clip_eps: float,
             value_clip_eps: float | None, vf_coef: float, ent_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
    """`policy_loss + vf_coef * value_loss - ent_coef * mean(entropy)` on one minibatch.

    Args:
        logp, old_logp, advantages, values, old_values, returns, entropy: `[n]`
            (advantages already normalised if wanted).

    Returns:
        `(loss, {"pg_loss", "value_loss", "entropy", "clip_frac"})`.
    """
    pg, clip_frac = policy_loss(logp, old_logp, advantages, clip_eps)
    vl = value_loss(values, old_values, returns, value_clip_eps)
    ent = entropy.mean()
    loss = pg + vf_coef * vl - ent_coef * ent
    return loss, {"pg_loss": pg.item(), "value_loss": vl.item(), "entropy": ent.item(), "clip_frac": clip_frac.item()}
