"""The one RL step for every task and algorithm: rollout -> advantages -> update epochs.

`rl_step` asks the algorithm's learner (`rl.learners`) to collect an `Experience` from the
task under `no_grad`, turns it into the rows to train on (`Batch`: advantages, value
targets), and runs `update`: `update_epochs` epochs, each taking one optimizer step per
minibatch (`algorithm.minibatches`; 1: one step over all rows in order; more: a fresh random
split each epoch from the run's generator, as in PPO's minibatch SGD, Schulman et al. 2017,
arXiv:1707.06347, Algorithm 1), each computed in chunks of at most `CHUNK` rows whose
gradients add up. With `algorithm.kl_coef > 0` the loss adds the exact KL over the action
tokens to the reference policy (`rl.reference`), computed once per step.

Fixed shapes (`fixed_rows`, set when the actor is compiled): every chunk's forward runs on
the same number of rows (`CHUNK`, or PPO's minibatch size, whose rollouts always have
`rollout_steps x num_envs` rows), a short one padded with copies of its first row whose
outputs are dropped before the loss, so the compiled model is traced once.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import torch
from torch import nn

from lora_runtime.config import AlgorithmConfig, RunConfig
from lora_runtime.rl.learners import Batch, GRPOLearner, PPOLearner
from lora_runtime.rl.policy import ActorPolicy
from lora_runtime.rl.reference import Reference

__all__ = ["CHUNK", "lr_at", "minibatch_indices", "rl_step", "update"]

CHUNK = 512  # rows per forward/backward pass


def minibatch_indices(total: int, minibatches: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The rows `0..total-1` split into `minibatches` near-equal index sets `[n_i]`.

    One minibatch is every row in order (no random draw). More are a fresh permutation from
    `generator` (so a run stays reproducible and resumes exactly), cut into
    `min(minibatches, total)` parts.
    """
    if minibatches == 1:
        return [torch.arange(total)]
    return list(torch.randperm(total, generator=generator).tensor_split(min(minibatches, total)))


def _padded(part: torch.Tensor, size: int) -> torch.Tensor:
    """`part` `[n]` followed by copies of its first row up to `size` rows."""
    return torch.cat([part, part[:1].expand(size - len(part))]) if len(part) < size else part


def reference_dists(policy: ActorPolicy, b: Batch, reference: Reference) -> torch.Tensor:
    """`[n, A, K]` the reference policy's log-probabilities on every row of `b` (no grad)."""
    ref_policy = ActorPolicy(None, policy.family, policy.action_ids, policy.temperature)

    def dist(m: nn.Module, part: torch.Tensor) -> torch.Tensor:  # [n, A, K]
        ref_policy.model = m
        return ref_policy(b.inputs.select(part), b.positions[part])[0]

    return torch.cat([reference.apply(lambda m, p=p: dist(m, p)) for p in torch.arange(len(b)).split(CHUNK)])


def update(policy: ActorPolicy, params: list[nn.Parameter], learner: GRPOLearner | PPOLearner, b: Batch,
           ref: torch.Tensor | None, optimizer: torch.optim.Optimizer, algo: AlgorithmConfig,
           generator: torch.Generator, fixed_rows: bool = False) -> dict[str, float]:
    """`algo.update_epochs` epochs of the learner's loss on `b` (with the KL to `ref`, the
    reference's `[n, A, K]` log-probabilities, when given); returns the last epoch's means."""
    total = len(b)
    if not fixed_rows:
        chunk = min(CHUNK, total)
    elif learner.fixed_total:  # PPO: every minibatch has (about) the same rows every step
        chunk = min(CHUNK, -(-total // min(algo.minibatches, max(total, 1))))
    else:
        chunk = CHUNK
    sums = dict.fromkeys(learner.stat_keys, 0.0)
    grad_norm = torch.zeros(())
    gap = 0.0  # largest |log-prob at rollout - at the update's first forward| of a taken token
    for epoch in range(algo.update_epochs if total else 0):
        sums = dict.fromkeys(learner.stat_keys, 0.0)  # the metrics are the last epoch's means over all rows
        for batch in minibatch_indices(total, algo.minibatches, generator):  # one optimizer step each
            optimizer.zero_grad(set_to_none=True)
            for part in batch.split(chunk):  # [n] row indices; gradients add up over the parts
                rows = _padded(part, chunk) if fixed_rows else part
                dist, values = policy(b.inputs.select(rows), b.positions[rows])  # [n', A, K], [n'] or None
                dist, values = dist[: len(part)], None if values is None else values[: len(part)]
                if epoch == 0:
                    gap = max(gap, _logp_gap(dist.detach(), b, part))
                loss, stats = learner.loss(dist, values, b, part, None if ref is None else ref[part])
                (loss * (len(part) / len(batch))).backward()
                entropy = -(dist.detach().exp() * dist.detach()).sum(-1).mean()
                for key, value in (("loss", loss.item()), ("entropy", entropy.item()), *stats.items()):
                    sums[key] += value * len(part) / total
            grad_norm = torch.nn.utils.clip_grad_norm_(params, algo.max_grad_norm)
            optimizer.step()
    return {**sums, "grad_norm": grad_norm.item(), "trained_rows": total, "rollout_logp_gap": gap}


def _logp_gap(dist: torch.Tensor, b: Batch, part: torch.Tensor) -> float:
    """`max |old_logp - logp|` over the taken action tokens of `part` that count (b.mask)."""
    diff = (dist.gather(-1, b.actions[part][..., None])[..., 0] - b.old_logp[part]).abs()  # [n, A]
    if b.mask is not None:
        diff = diff * b.mask[part]
    return diff.max().item() if diff.numel() else 0.0


def rl_step(model: nn.Module, policy: ActorPolicy, learner: GRPOLearner | PPOLearner, task, reference: Reference,
            optimizer: torch.optim.Optimizer, run_cfg: RunConfig, generator: torch.Generator,
            device: torch.device, fixed_rows: bool = False,
            rollout_context: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext) -> dict[str, float]:
    """One step: rollouts through `policy`, then `update`; returns the step's metrics.

    Args:
        model: the trained module (its trainable parameters are clipped and stepped).
        policy: the actor (or its compiled wrapper) as a policy, with the value head for PPO.
        learner: `learners.learner_for(run_cfg.algorithm)`.
        rollout_context: the block the rollout runs in (`rollout_weights.RolloutWeights.context`:
            inside `merged()` when chosen).
    """
    algo = run_cfg.algorithm
    start = time.perf_counter()
    model.eval()
    calls = policy.calls
    with rollout_context():
        exp = learner.collect(task, policy, generator)
    forwards = policy.calls - calls
    train_start = time.perf_counter()
    b = learner.batch(exp, device)
    ref = reference_dists(policy, b, reference) if algo.kl_coef > 0 and len(b) else None  # in eval mode, once
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    stats = update(policy, params, learner, b, ref, optimizer, algo, generator, fixed_rows)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    now = time.perf_counter()
    return {**exp.stats, **stats, "rollout_forwards": forwards, "train_s": now - train_start, "step_time_s": now - start,
            "samples_per_s": exp.samples / (now - start)}


def lr_at(algo: AlgorithmConfig, steps: int, i: int) -> float:
    """Learning rate of this run's step `i` (0-based) of `steps`: constant, or cosine from `lr`
    down to `lr * min_lr_ratio` (a resumed run starts its own schedule)."""
    if algo.lr_schedule == "constant" or steps == 1:
        return algo.lr
    progress = i / (steps - 1)
    return algo.lr * (algo.min_lr_ratio + (1.0 - algo.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
