"""Which parameters train, and how many there are."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lora_runtime.adapters.targets import iter_lora_layers

__all__ = ["TrainableSummary", "mark_only_lora_trainable", "trainable_summary"]


@dataclass(frozen=True)
class TrainableSummary:
    """Parameter counts of a model (shared parameters counted once)."""

    trainable: int
    total: int

    @property
    def percentage(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,d} || all params: {self.total:,d} "
            f"|| trainable%: {self.percentage:.4f}"
        )


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Counts trainable and total parameters, as PEFT's `print_trainable_parameters` prints."""
    params = list(model.parameters())  # deduplicated by identity
    return TrainableSummary(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
    )


def mark_only_lora_trainable(model: nn.Module) -> None:
    """`requires_grad` True on adapter parameters, False on everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in iter_lora_layers(model):
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)
