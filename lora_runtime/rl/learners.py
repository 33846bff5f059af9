"""The algorithms as learners of the one loop: how each collects, what each trains on,
what each minimises. The math itself is in `rl.algorithms` (pure functions of tensors).

- `GRPOLearner`: `batch_size` seeds on all ranks, `group_size` rollouts each
  (`task.collect`); a rollout's advantage is its return relative to its group
  (`algorithms.grpo.group_advantages`), shared by every row of the rollout. Where the task
  asks for it (`Experience.drop_flat_groups`: the episodic tasks), a group whose rollouts all
  returned the same has zero advantage and is left out, as in DAPO's dynamic sampling (Yu et
  al. 2025, arXiv:2503.14476) -- in a single process. Under torchrun every row is kept (a flat
  group adds nothing to the policy gradient), so that every rank takes the same forward and
  backward passes and DDP / FSDP2's collectives line up.
- `PPOLearner`: `rollout_steps` steps of every environment with a value head
  (`task.collect_steps`), GAE(lambda) advantages normalised over the rollout, the clipped
  policy and value losses and an entropy bonus (`algorithms.ppo`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lora_runtime.config import AlgorithmConfig, GRPOConfig, PPOConfig
from lora_runtime.parallel import get_world_size, reduce_metrics, share_size
from lora_runtime.rl.algorithms import group_advantages, grpo_loss, kl_divergence
from lora_runtime.rl.algorithms.grpo import episode_weights
from lora_runtime.rl.algorithms.ppo import gae, normalize, ppo_loss
from lora_runtime.rl.models import ModelInputs
from lora_runtime.rl.policy import ActorPolicy
from lora_runtime.rl.tasks import Experience, Task


@dataclass
class Batch:
    """The rows an update trains on (on the model's device)."""

    inputs: ModelInputs  # n rows
    positions: torch.Tensor  # [n, A]
    actions: torch.Tensor  # [n, A]
    old_logp: torch.Tensor  # [n, A]
    advantages: torch.Tensor  # [n]
    old_values: torch.Tensor | None = None  # [n] (PPO)
    returns: torch.Tensor | None = None  # [n] value targets (PPO)
    mask: torch.Tensor | None = None  # [n, A] float, the action tokens that count (text); None: all
    weights: torch.Tensor | None = None  # [n] the rows' loss weights (steps of episodes, GRPO); None: all 1
    tokens_per_row: float | None = None  # token_mean's divisor per row: every rank's tokens / rows (text)

    def __len__(self) -> int:
        return len(self.actions)


def _rows(exp: Experience, index: torch.Tensor, advantages: torch.Tensor, device: torch.device) -> Batch:
    at = index.to(exp.actions.device)
    mask = None if exp.mask is None else exp.mask[at].to(device)
    return Batch(exp.inputs.select(at).to(device), exp.positions[at].to(device), exp.actions[at].to(device),
                 exp.old_logp[at].to(device), advantages.to(device), mask=mask)


class GRPOLearner:
    """Group-relative advantages over seed-grouped rollouts; no value head."""

    uses_value_head = False
    fixed_total = False  # the rows to train on vary from step to step
    shares_sampling_stream = False  # each rank draws its own seeds and actions
    stat_keys = ("loss", "pg_loss", "kl", "clip_frac", "entropy")

    def __init__(self, algo: GRPOConfig) -> None:
        self.algo = algo

    def collect(self, task: Task, policy: ActorPolicy, generator: torch.Generator) -> Experience:
        return task.collect(policy, share_size(self.algo.batch_size), self.algo.group_size, generator)

    def batch(self, exp: Experience, device: torch.device) -> Batch:
        adv = group_advantages(exp.returns.cpu(), exp.group_size)[exp.episode.cpu()]  # [N]
        if get_world_size() > 1 or not exp.drop_flat_groups:
            keep = torch.arange(len(adv))  # [N] every row (the same rows on every rank)
        else:
            keep = adv.ne(0).nonzero()[:, 0]  # [N'] rows of groups whose returns differ (the others carry no signal)
        b = _rows(exp, keep, adv[keep], device)
        weights = episode_weights(exp.episode.cpu()[keep], self.algo.loss_type)  # [N'] or None
        b.weights = None if weights is None else weights.to(device)
        if b.mask is not None:  # every rank has as many rows: the mean of the ranks' means is the batch's
            b.tokens_per_row = reduce_metrics({"tokens_per_row": b.mask.sum() / max(len(b), 1)})["tokens_per_row"]
        return b

    def loss(self, dist: torch.Tensor, values: torch.Tensor | None, b: Batch, part: torch.Tensor,
             ref: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of rows `part` from their `[n, A, K]` log-probabilities (and the reference's)."""
        logp = dist.gather(-1, b.actions[part][..., None])[..., 0]  # [n, A]
        kl = _kl(dist, ref)  # [n, A] (after logp: the order autograd sums the gradients in)
        if b.mask is None:
            return grpo_loss(logp, b.old_logp[part], b.advantages[part], kl, self.algo.clip_eps, self.algo.kl_coef,
                             row_weights=None if b.weights is None else b.weights[part])
        # token_mean: over the whole batch's tokens, every rank's (exact with minibatches: 1)
        return grpo_loss(logp, b.old_logp[part], b.advantages[part], kl, self.algo.clip_eps, self.algo.kl_coef,
                         mask=b.mask[part], loss_type=self.algo.loss_type, tokens_per_row=b.tokens_per_row)


class PPOLearner:
    """GAE over fixed-length rollouts; a value head trained with the policy."""

    uses_value_head = True
    fixed_total = True  # rollout_steps x num_envs rows every step
    shares_sampling_stream = True  # ranks step their share of one rollout (`episodes.run_steps`)
    stat_keys = ("loss", "pg_loss", "value_loss", "kl", "clip_frac", "entropy")

    def __init__(self, algo: PPOConfig) -> None:
        self.algo = algo

    def collect(self, task: Task, policy: ActorPolicy, generator: torch.Generator) -> Experience:
        return task.collect_steps(policy, self.algo.rollout_steps, generator)

    def batch(self, exp: Experience, device: torch.device) -> Batch:
        a = self.algo
        adv, returns = gae(exp.rewards, exp.values, exp.next_values, exp.terminated, exp.ended, a.gamma, a.gae_lambda)
        adv, returns = adv.reshape(-1), returns.reshape(-1)  # [T * M] t-major, as the rows
        if a.normalize_advantages:
            adv = normalize(adv, moments=_moments_over_ranks(adv) if get_world_size() > 1 else None)
        b = _rows(exp, torch.arange(len(adv)), adv, device)
        b.old_values, b.returns = exp.values.reshape(-1).to(device), returns.to(device)
        return b

    def loss(self, dist: torch.Tensor, values: torch.Tensor | None, b: Batch, part: torch.Tensor,
             ref: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of rows `part` from their `[n, A, K]` log-probabilities and `[n]` values."""
        a = self.algo
        logp = dist.gather(-1, b.actions[part][..., None])[..., 0].sum(-1)  # [n] (one action token per step)
        kl = _kl(dist, ref)
        entropy = -(dist.exp() * dist).sum(-1).sum(-1)  # [n]
        loss, stats = ppo_loss(logp, b.old_logp[part].sum(-1), b.advantages[part], values, b.old_values[part],
                               b.returns[part], entropy, a.clip_eps, a.value_clip_eps, a.vf_coef, a.ent_coef)
        kl_mean = kl.mean()
        return loss + a.kl_coef * kl_mean, {**stats, "kl": kl_mean.item()}


def _moments_over_ranks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(mean, std)` (unbiased) of `x` `[n]` over every rank's rows: the moments one process
    holding all the rows would use."""
    acc = torch.stack([x.sum(), (x * x).sum(), torch.tensor(float(x.numel()))]).double()  # [3]
    torch.distributed.all_reduce(acc)
    total, squares, n = acc.tolist()
    mean = total / n
    std = math.sqrt(max(squares - n * mean * mean, 0.0) / max(n - 1.0, 1.0))
    return torch.tensor(mean, dtype=x.dtype), torch.tensor(std, dtype=x.dtype)


def _kl(dist: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    """`[n, A]` KL to the reference, or a zero when the step has no reference (`kl_coef: 0`)."""
    return torch.zeros((), device=dist.device) if ref is None else kl_divergence(dist, ref)


def learner_for(algo: AlgorithmConfig) -> GRPOLearner | PPOLearner:
    """The learner of `algorithm.name`."""
    return {"grpo": GRPOLearner, "ppo": PPOLearner}[algo.name](algo)


def make_value_head(hidden: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> nn.Linear:
    """`Linear(hidden, 1)` with a small init (std 0.01 weights, zero bias, as CleanRL's
    critic output layer), drawn from `generator`."""
    head = nn.Linear(hidden, 1, dtype=dtype, device=device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
        head.bias.zero_()
    return head
