"""A gymnasium environment defined here, for `task.kind: gym` (`task.entry: "support.gym_corridor:make_env"`).

A corridor of 5 cells; the agent starts in the middle; the mission says "go left" or "go
right". Actions: 0 left, 1 right, 2 stay. Reaching the named end: reward 1, terminated;
the other end: reward 0, terminated; 8 steps: truncated.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

CELLS = 5
SIDE = 14  # the built-in actor's image_size in tests/tiny_episodic.py


class Corridor(gym.Env):
    metadata: ClassVar[dict[str, Any]] = {}

    def __init__(self) -> None:
        self.action_space = gym.spaces.Discrete(3)
        self.observation_space = gym.spaces.Dict({
            "image": gym.spaces.Box(0, 255, (SIDE, SIDE, 3), np.uint8),
            "target": gym.spaces.Discrete(2),  # 0: left end, 1: right end
        })
        self.pos, self.target, self.t = CELLS // 2, 0, 0

    def _obs(self) -> dict[str, Any]:
        image = np.zeros((SIDE, SIDE, 3), np.uint8)
        image[:, self.pos * 2:self.pos * 2 + 2, 0] = 255  # the agent, as a red column
        return {"image": image, "target": self.target}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict[str, Any], dict]:
        super().reset(seed=seed)
        self.pos, self.t = CELLS // 2, 0
        self.target = int(self.np_random.integers(2))
        return self._obs(), {}

    def step(self, action: int) -> tuple[dict[str, Any], float, bool, bool, dict]:
        self.pos += {0: -1, 1: 1, 2: 0}[int(action)]
        self.t += 1
        at_end = self.pos in (0, CELLS - 1)
        reward = float(at_end and self.pos == (0 if self.target == 0 else CELLS - 1))
        return self._obs(), reward, at_end, self.t >= 8 and not at_end, {}


class CorridorAdapter:
    """The observation adapter: image as is, the mission from `target`, one symbol word."""

    vocabulary = ("go", "left", "right")
    symbol_vocabulary = tuple(f"cell{i}" for i in range(CELLS))

    def image(self, obs: dict[str, Any]) -> np.ndarray:
        return obs["image"]

    def words(self, obs: dict[str, Any]) -> list[str]:
        return ["go", "left" if int(obs["target"]) == 0 else "right"]

    def symbols(self, obs: dict[str, Any]) -> list[str]:
        return [f"cell{int(np.argmax(obs['image'][0, ::2, 0]))}"]

    def expert(self, env: gym.Env) -> Iterator[int]:
        while True:
            yield env.unwrapped.target  # 0 = left, 1 = right


def make_env() -> tuple[gym.Env, CorridorAdapter]:
    return Corridor(), CorridorAdapter()


def make_nothing() -> str:
    return "not an environment"
