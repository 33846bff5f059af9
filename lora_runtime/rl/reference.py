"""The reference policy of the KL penalty: the base model.

LoRA modes compute it with the adapters disabled (`adapter_disabled`, no copy); full mode
keeps a frozen copy of the weights taken before training.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from lora_runtime.adapters import adapter_disabled, unwrap_model


class Reference:
    """Runs functions of the model with the reference weights."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        self.frozen: nn.Module | None = None
        if mode == "full":
            self.frozen = copy.deepcopy(unwrap_model(model)).eval()
            for p in self.frozen.parameters():
                p.requires_grad_(False)
        self.model = model

    @torch.no_grad()
    def apply(self, fn: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
        """`fn(model)` with the reference weights (adapters disabled, or the frozen copy)."""
        if self.frozen is not None:
            return fn(self.frozen)
        with adapter_disabled(self.model):
            return fn(self.model)
