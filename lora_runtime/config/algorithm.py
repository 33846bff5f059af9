"""The `algorithm` section: the RL algorithm's hyper-parameters, picked by `name`.

- `name: grpo` (the default): `group_size` rollouts of each of `batch_size` seeds,
  advantages relative to the group, a clipped-ratio surrogate and a KL penalty to the base
  policy (Shao et al. 2024, arXiv:2402.03300).
- `name: ppo`: `rollout_steps` steps of every environment, a value head on the actor's last
  hidden state, GAE(lambda), clipped policy and value losses, an entropy bonus (Schulman et
  al. 2017, arXiv:1707.06347); multi-step tasks only.

The optimizer (AdamW) and its schedule belong to the algorithm's section: they are what a
second algorithm may want to set differently.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, StrictBool, StrictInt

from lora_runtime.config.base import Strict


class OptimSection(Strict):
    """Keys every algorithm shares: optimizer, schedule, clipping, epochs, sampling."""

    lr: float = Field(3e-3, gt=0.0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    update_epochs: StrictInt = Field(1, ge=1)
    minibatches: StrictInt = Field(1, ge=1)  # optimizer steps per epoch, PPO-style
    temperature: float = Field(1.0, gt=0.0)  # sampling temperature of the rollouts
    clip_eps: float = Field(0.2, gt=0.0)
    kl_coef: float = Field(0.0, ge=0.0)  # KL to the base policy (0: no reference pass)


class GRPOConfig(OptimSection):
    """`name: grpo`: `group_size` rollouts per seed, advantages relative to the group."""

    name: Literal["grpo"] = "grpo"
    batch_size: StrictInt = Field(16, ge=1)  # seeds (prompts, scenes) per step, over all ranks
    group_size: StrictInt = Field(8, ge=2)
    # How per-token losses of sequences of different lengths (text) are averaged:
    # "sequence_mean": each sequence's mean over its tokens, then over sequences (GRPO as
    #   published, Shao et al. 2024, arXiv:2402.03300, eq. 3);
    # "token_mean": over all the batch's tokens at once (DAPO, Yu et al. 2025,
    #   arXiv:2503.14476, eq. 12: long answers weigh more);
    # "dr_grpo": each sequence's sum over a constant, the longest length (Dr. GRPO, Liu
    #   et al. 2025, arXiv:2503.20783, sec. 3.1: no length bias).
    # Every row of a one-step task has the same tokens, where the three agree.
    loss_type: Literal["sequence_mean", "token_mean", "dr_grpo"] = "sequence_mean"


class PPOConfig(OptimSection):
    """`name: ppo`: fixed-length rollouts of every environment and a learned value."""

    name: Literal["ppo"] = "ppo"
    rollout_steps: StrictInt = Field(32, ge=1)  # steps of each environment per iteration
    gamma: float = Field(0.99, ge=0.0, le=1.0)
    gae_lambda: float = Field(0.95, ge=0.0, le=1.0)
    vf_coef: float = Field(0.5, ge=0.0)
    value_clip_eps: float | None = Field(0.2, gt=0.0)  # null: unclipped value loss
    ent_coef: float = Field(0.01, ge=0.0)
    normalize_advantages: StrictBool = True
    update_epochs: StrictInt = Field(4, ge=1)
    minibatches: StrictInt = Field(4, ge=1)


def _default_name(value: Any) -> Any:
    if isinstance(value, dict) and "name" not in value:
        return {"name": "grpo", **value}
    return value


AlgorithmConfig = Annotated[GRPOConfig | PPOConfig, Field(discriminator="name"), BeforeValidator(_default_name)]
ALGORITHMS: dict[str, type[OptimSection]] = {"grpo": GRPOConfig, "ppo": PPOConfig}
