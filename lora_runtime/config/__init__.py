"""Validated run configuration: the YAML file's sections as pydantic models (no torch).

- `actor`: the mode and adapter (`actor.model`) and the built-in actor's sizes;
- `task`: one shape per `task.kind` (`config.task`; plug-ins register their own);
- `algorithm`: the RL algorithm's hyper-parameters, picked by `algorithm.name`;
- `runner`: output folder, steps, seed, threads, device, distribution, saving, display.

The config holds values only: it can be validated, printed and diffed without building
anything.
"""

from lora_runtime.config.actor import ActorConfig, ActorModelConfig, BuiltinActorConfig, Mode
from lora_runtime.config.algorithm import AlgorithmConfig, GRPOConfig, PPOConfig
from lora_runtime.config.base import ConfigError
from lora_runtime.config.loading import RunConfig, load_config, set_dotted, validate_config
from lora_runtime.config.runner import RunnerConfig
from lora_runtime.config.task import (
    BabyAISection,
    EpisodicSection,
    GymSection,
    ReachSection,
    RewardSpec,
    TaskSection,
    TextSection,
    register_task_section,
    task_kinds,
)

__all__ = [
    "ActorConfig",
    "ActorModelConfig",
    "AlgorithmConfig",
    "BabyAISection",
    "BuiltinActorConfig",
    "ConfigError",
    "EpisodicSection",
    "GRPOConfig",
    "GymSection",
    "Mode",
    "PPOConfig",
    "ReachSection",
    "RewardSpec",
    "RunConfig",
    "RunnerConfig",
    "TaskSection",
    "TextSection",
    "load_config",
    "register_task_section",
    "set_dotted",
    "task_kinds",
    "validate_config",
]
