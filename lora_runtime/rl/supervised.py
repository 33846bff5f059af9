"""The one supervised loop of the warm starts: AdamW, linear warm-up, cosine decay.

`fit(model, steps, lr, warmup_steps, loss_at)` trains every parameter of `model` in place:
step `i` minimises `loss_at(i)` (the caller draws its batch there), with the learning rate
`lr * min(1, (i + 1) / warmup_steps) * (1 + cos(pi * i / steps)) / 2`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def fit(model: nn.Module, steps: int, lr: float, warmup_steps: int, loss_at: Callable[[int], torch.Tensor],
        on_step: Callable[[int, float], None] | None = None) -> float:
    """Trains all of `model` for `steps` AdamW steps; returns the last loss (NaN for 0 steps).

    Args:
        model: left in train mode, with every parameter trainable and no gradients kept.
        steps, lr, warmup_steps: the schedule above.
        loss_at: step index -> scalar loss (with grad).
        on_step: called as `on_step(step, loss)` after each step (1-based).
    """
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup_steps) * 0.5 * (1.0 + math.cos(math.pi * i / max(steps, 1))))
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_value = loss.item()
        if on_step is not None:
            on_step(step + 1, loss_value)
    for p in params:
        p.grad = None
    return loss_value
