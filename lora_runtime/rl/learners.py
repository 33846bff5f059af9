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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_runtime.config import AlgorithmConfig, GRPOConfig
from lora_runtime.parallel import get_world_size, share_size
from lora_runtime.rl.algorithms import group_advantages, grpo_loss, kl_divergence
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

    def __len__(self) -> int:
        return len(self.actions)


def _rows(exp: Experience, index: torch.Tensor, advantages: torch.Tensor, device: torch.device) -> Batch:
    at = index.to(exp.actions.device)
    return Batch(exp.inputs.select(at).to(device), exp.positions[at].to(device), exp.actions[at].to(device),
                 exp.old_logp[at].to(device), advantages.to(device))


class GRPOLearner:
    """Group-relative advantages over seed-grouped rollouts; no value head."""

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
        return _rows(exp, keep, adv[keep], device)

    def loss(self, dist: torch.Tensor, values: torch.Tensor | None, b: Batch, part: torch.Tensor,
             ref: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of rows `part` from their `[n, A, K]` log-probabilities (and the reference's)."""
        logp = dist.gather(-1, b.actions[part][..., None])[..., 0]  # [n, A]
        kl = _kl(dist, ref)  # [n, A] (after logp: the order autograd sums the gradients in)
        return grpo_loss(logp, b.old_logp[part], b.advantages[part], kl, self.algo.clip_eps, self.algo.kl_coef)


def _kl(dist: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
    """`[n, A]` KL to the reference, or a zero when the step has no reference (`kl_coef: 0`)."""
    return torch.zeros((), device=dist.device) if ref is None else kl_divergence(dist, ref)


def learner_for(algo: AlgorithmConfig) -> GRPOLearner:
    """The learner of `algorithm.name`."""
    return {"grpo": GRPOLearner}[algo.name](algo)
