"""The actor as a policy over action tokens: log-probabilities at the action positions.

Every task keeps its actions as the last `K` ids of the actor's vocabulary (as OpenVLA
does); the policy is the softmax over those `K` logits only, at a temperature. With a
value head (PPO), the same forward also gives the value of each row's state, read from the
last hidden state at the row's first action position.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_runtime.rl.models import ModelFamily, ModelInputs


def action_log_probs(logits: torch.Tensor, action_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities over the action tokens only (the policy never emits other tokens).

    Args:
        logits: `[..., vocab]`.
        action_ids: `[K]` vocabulary ids of the action tokens.
        temperature: softmax temperature.

    Returns:
        `[..., K]` float32 log-probabilities.
    """
    return torch.log_softmax(logits.index_select(-1, action_ids).float() / temperature, dim=-1)


def _at(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`x [N, T, C]` at `positions [N, A]` -> `[N, A, C]`."""
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


def action_dist(model: nn.Module, family: ModelFamily, inputs: ModelInputs, positions: torch.Tensor,
                action_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """`[N, A, K]` log-probabilities over the action tokens at `positions` `[N, A]` of each prompt."""
    logits = family.logits(model, inputs).index_select(-1, action_ids)  # [N, T, K]
    return torch.log_softmax(_at(logits, positions).float() / temperature, dim=-1)


class ActorPolicy:
    """`policy(inputs, positions) -> (dist [N, A, K], values [N] or None)` for rollouts and updates.

    Args:
        model: the actor (or its compiled / distributed wrapper: the one to call).
        family: its model family.
        action_ids: `[K]` on the model's device.
        temperature: softmax temperature.
        value_head: `Linear(D, 1)` on the last hidden state (PPO), or None.
    """

    def __init__(self, model: nn.Module, family: ModelFamily, action_ids: torch.Tensor, temperature: float,
                 value_head: nn.Module | None = None) -> None:
        self.model, self.family, self.action_ids = model, family, action_ids
        self.temperature, self.value_head = temperature, value_head
        self.calls = 0  # forwards so far (what a rollout costs, for `rollout_weights`)

    def __call__(self, inputs: ModelInputs, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.calls += 1
        if self.value_head is None:
            return action_dist(self.model, self.family, inputs, positions, self.action_ids, self.temperature), None
        logits, hidden = self.family.logits_and_hidden(self.model, inputs)  # [N, T, V], [N, T, D]
        dist = torch.log_softmax(_at(logits.index_select(-1, self.action_ids), positions).float() / self.temperature, -1)
        state = _at(hidden, positions[:, :1])[:, 0]  # [N, D] at the first action position
        return dist, self.value_head(state.to(self.value_head.weight.dtype)).float()[:, 0]  # [N, A, K], [N]


def gumbel_sample(logp: torch.Tensor, generator: torch.Generator, rows: slice | None = None,
                  total_rows: int | None = None) -> torch.Tensor:
    """`[N, ...]` indices drawn from `logp` `[N, ..., K]` with Gumbel noise from a CPU `generator`
    (the same draws on any device, so a run's sampling state saves and restores exactly).

    With `rows` and `total_rows` (ranks that share one stream), the noise is drawn for all
    `total_rows` rows and rows `rows` of it are used: every rank's generator stays in step and
    the rows together are the draws of one process.
    """
    shape = logp.shape if rows is None else (total_rows, *logp.shape[1:])
    u = torch.rand(shape, generator=generator)
    u = (u if rows is None else u[rows]).clamp_(1e-9, 1.0 - 1e-9).to(logp.device)
    return (logp - torch.log(-torch.log(u))).argmax(dim=-1)
