"""One GRPO step and its pieces: the reference policy, the update, the learning rate.

One step: sample `batch_size` scenes, `group_size` action sequences each (`grpo`), score
them, take `update_epochs` clipped-ratio updates with an optional KL penalty to the
reference policy (the base: `adapter_disabled` in LoRA modes, a frozen copy in full mode).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
from torch import nn

from lora_runtime.adapters import adapter_disabled, unwrap_model
from lora_runtime.config import TrainerConfig
from lora_runtime.parallel import share_size
from lora_runtime.rl import grpo
from lora_runtime.rl.episode_step import episode_step
from lora_runtime.rl.tasks.episodic import EpisodicTask
from lora_runtime.rl.tasks.reach import ReachTask

__all__ = ["Reference", "lr_at", "rl_step"]


class Reference:
    """Log-probabilities of the reference policy: the base model.

    LoRA modes compute it with the adapters disabled (no copy); full mode keeps a frozen
    copy of the weights taken before training.
    """

    def __init__(self, model: nn.Module, mode: str) -> None:
        self.frozen: nn.Module | None = None
        if mode == "full":
            self.frozen = copy.deepcopy(unwrap_model(model)).eval()
            for p in self.frozen.parameters():
                p.requires_grad_(False)
        self.model = model

    @torch.no_grad()
    def log_probs(self, logits_fn: grpo.LogitsFn, rollout: grpo.Rollout, action_ids: torch.Tensor, temp: float) -> torch.Tensor:
        """`[N, A, K]` reference log-probabilities over the action bins."""
        if self.frozen is not None:
            return grpo.policy_log_probs(self.frozen, logits_fn, rollout, action_ids, temp)[1]
        with adapter_disabled(self.model):
            return grpo.policy_log_probs(self.model, logits_fn, rollout, action_ids, temp)[1]

    @torch.no_grad()
    def apply(self, fn: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
        """`fn(model)` with the reference weights (adapters disabled, or the frozen copy)."""
        if self.frozen is not None:
            return fn(self.frozen)
        with adapter_disabled(self.model):
            return fn(self.model)


def rl_step(
    model: nn.Module,
    forward_model: nn.Module,
    logits_fn: grpo.LogitsFn,
    reference: Reference,
    optimizer: torch.optim.Optimizer,
    task: ReachTask | EpisodicTask,
    cfg: TrainerConfig,
    generator: torch.Generator,
    device: torch.device,
) -> dict[str, float]:
    """One GRPO step (rollout, reference, `update_epochs` updates); returns its metrics.

    A multi-step task (`EpisodicTask`) runs `episode_step.episode_step` instead (whole
    episodes, seed-grouped), with `logits_fn` an `(model, ObsBatch) -> [N, vocab]`.
    """
    if isinstance(task, EpisodicTask):
        return episode_step(model, forward_model, logits_fn, reference, optimizer, task, cfg, generator, device)
    start = time.perf_counter()
    action_ids = torch.tensor(task.tokens.actions, device=device)
    scenes = task.sample(share_size(cfg.batch_size), generator).to(device)  # this rank's share
    model.eval()
    rollout = grpo.collect_rollout(
        forward_model, logits_fn, task, scenes, action_ids, cfg.group_size, cfg.temperature, generator
    )
    ref = reference.log_probs(logits_fn, rollout, action_ids, cfg.temperature)  # [N, A, K]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(cfg.update_epochs):
        logp, dist = grpo.policy_log_probs(forward_model, logits_fn, rollout, action_ids, cfg.temperature)
        kl = grpo.kl_divergence(dist, ref)
        loss, stats = grpo.grpo_loss(logp, rollout.old_logp, rollout.advantages, kl, cfg.clip_eps, cfg.kl_coef)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    entropy = -(dist.detach().exp() * dist.detach()).sum(-1).mean()
    return {
        "reward_mean": rollout.rewards.mean().item(),
        "reward_std": rollout.rewards.std().item(),
        "loss": loss.item(),
        "entropy": entropy.item(),
        "grad_norm": grad_norm.item(),
        "step_time_s": elapsed,
        "samples_per_s": rollout.rewards.numel() / elapsed,
        **stats,
    }


def lr_at(cfg: TrainerConfig, i: int) -> float:
    """Learning rate of this run's step `i` (0-based): constant, or cosine from `lr` down to
    `lr * min_lr_ratio` over this run's `steps` (a resumed run starts its own schedule)."""
    if cfg.lr_schedule == "constant" or cfg.steps == 1:
        return cfg.lr
    progress = i / (cfg.steps - 1)
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
