"""RL algorithms as pure functions of tensors (advantages, losses), tested against float64
references by hand; `lora_runtime.rl.loop` strings them into the update."""

from lora_runtime.rl.algorithms.grpo import group_advantages, grpo_loss, kl_divergence

__all__ = ["group_advantages", "grpo_loss", "kl_divergence"]
