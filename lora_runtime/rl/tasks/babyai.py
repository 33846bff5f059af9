"""BabyAI / MiniGrid levels (Farama's `minigrid`) as seen by the actor.

An observation of a MiniGrid environment is a dict: `image` `[7, 7, 3]` (the agent's
egocentric partial view, one `(object, colour, state)` triple per cell), `direction` and
`mission` (a sentence of the BabyAI grammar, e.g. "go to the red ball"). This module turns it
into what the actor reads:

- **pixels** for the built-in actor: the RGB partial view exactly as minigrid's own
  `RGBImgPartialObsWrapper(tile_size)` draws it (`env.get_frame(agent_pov=True)`), composed
  here from the symbolic view with tiles drawn once by minigrid's `Grid.render_tile`: the same
  image at about 3x the environment steps per second (`tests/test_babyai.py` checks the two
  are equal pixel for pixel);
- **mission words** through `VOCABULARY` (the BabyAI grammar, written out below); a word
  outside it is an error naming the word and the level, never a silent unknown token;
- **symbol words** for text-only language models: one word per cell of the 7x7 view
  (`<object>_<colour>_<state>`, e.g. `key_red_0`), as they read the reach board.

Actions are MiniGrid's 7 (left, right, forward, pickup, drop, toggle, done), one action token
each.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from lora_runtime.config import BabyAISection, ConfigError, RunConfig
from lora_runtime.rl.tasks.episodic import EpisodicTask

# The BabyAI grammar (minigrid/envs/babyai/core/verifier.py: ObjDesc.surface and the
# instructions' surface()): verbs, articles, colours, object types, locations, connectives.
BABYAI_WORDS: tuple[str, ...] = (
    "go", "to", "pick", "up", "open", "put", "next",
    "the", "a",
    "red", "green", "blue", "purple", "yellow", "grey",
    "ball", "box", "key", "door", "object",
    "in", "front", "of", "you", "behind", "on", "your", "left", "right",
    "then", "after", "and", ",",
)
# MiniGrid's own (non-BabyAI) missions, e.g. "get to the green goal square", "use the key to
# open the door and then get to the goal", "avoid the lava and get to the green goal square".
MINIGRID_WORDS: tuple[str, ...] = (
    "get", "goal", "square", "use", "avoid", "lava", "reach", "grab", "fetch", "pick", "unlock",
    "match", "color", "same", "as", "square", "agent",
)
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(BABYAI_WORDS + MINIGRID_WORDS))

VIEW = 7  # MiniGrid's default agent_view_size
NUM_ACTIONS = 7
STATES = 3  # MiniGrid cell states (door: open, closed, locked)
ACTION_NAMES = ("left", "right", "forward", "pickup", "drop", "toggle", "done")

_TOKEN = re.compile(r"[a-z]+|,")


def mission_words(mission: str, env_id: str = "the environment") -> list[str]:
    """Splits a mission into vocabulary words (lower case; commas are words).

    Raises:
        ConfigError: a word outside `VOCABULARY` (names the word, the mission and the level).
    """
    words = _TOKEN.findall(mission.lower())
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown or not words:
        what = f"the word {unknown[0]!r}" if unknown else "no word"
        raise ConfigError(
            f"task.env_id={env_id!r}: the mission {mission!r} has {what} outside the BabyAI vocabulary "
            f"(lora_runtime.rl.tasks.babyai.VOCABULARY: {' '.join(VOCABULARY)}); pick a BabyAI/MiniGrid "
            "level whose missions use these words, or bring your own adapter with task.kind: gym"
        )
    return words


def symbol_vocabulary() -> tuple[str, ...]:
    """Every word `symbol_words` can return (object x colour x state)."""
    from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX  # deferred: optional dependency

    return tuple(f"{o}_{c}_{s}" for o in OBJECT_TO_IDX for c in COLOR_TO_IDX for s in range(3))


def symbol_words(image: np.ndarray) -> list[str]:
    """`[7, 7, 3]` symbolic view -> 49 words, row by row of the rendered view (y, then x)."""
    from minigrid.core.constants import IDX_TO_COLOR, IDX_TO_OBJECT  # deferred: optional dependency

    return [f"{IDX_TO_OBJECT[int(t)]}_{IDX_TO_COLOR[int(c)]}_{int(s)}"
            for t, c, s in image.transpose(1, 0, 2).reshape(-1, 3)]


class PovRenderer:
    """Draws the RGB partial view from the symbolic one, as `RGBImgPartialObsWrapper` does.

    minigrid renders the agent's view grid (`gen_obs_grid`) with the agent at the bottom
    centre facing up, invisible cells left empty and visible cells highlighted; every tile
    comes from `Grid.render_tile`. The symbolic view encodes exactly that grid (unseen cells
    are type 0, the agent's cell holds what it carries), so one tile per
    `(type, colour, state, agent here)` reproduces the image.

    Args:
        tile_size: pixels per cell; the image is `7 * tile_size` square.
    """

    def __init__(self, tile_size: int) -> None:
        from minigrid.core.constants import (  # deferred: optional dependency
            COLOR_TO_IDX,
            OBJECT_TO_IDX,
        )

        self.tile_size = tile_size
        self._shape = (len(OBJECT_TO_IDX), len(COLOR_TO_IDX), STATES, 2)  # (type, colour, state, agent here)
        n = int(np.prod(self._shape))
        self._lut = np.zeros((n, tile_size, tile_size, 3), dtype=np.uint8)  # [keys, t, t, 3], filled lazily
        self._drawn = np.zeros(n, dtype=bool)
        agent = np.zeros((VIEW, VIEW), dtype=np.int64)  # [x, y]
        agent[VIEW // 2, VIEW - 1] = 1  # the agent sits at the bottom centre of its view
        self._agent = agent

    def _draw(self, key: int) -> None:
        from minigrid.core.grid import Grid  # deferred: optional dependency
        from minigrid.core.world_object import WorldObj  # deferred: optional dependency

        type_idx, color_idx, state, agent = (int(v) for v in np.unravel_index(key, self._shape))
        obj = None if type_idx in (0, 1) else WorldObj.decode(type_idx, color_idx, state)
        self._lut[key] = Grid.render_tile(obj, agent_dir=3 if agent else None, highlight=type_idx != 0,
                                          tile_size=self.tile_size)
        self._drawn[key] = True

    def batch(self, images: np.ndarray) -> np.ndarray:
        """`[N, 7, 7, 3]` symbolic views (indexed `[n, x, y]`) -> `[N, 7*t, 7*t, 3]` uint8 RGB.

        One table lookup per cell (tiles drawn once by `Grid.render_tile`), no Python loop
        over cells.
        """
        t, (_, colours, states, _) = self.tile_size, self._shape
        cells = images.astype(np.int64)  # [N, 7, 7, 3]
        if cells[..., 2].max(initial=0) >= states:
            raise ValueError(f"a cell state of {int(cells[..., 2].max())}; MiniGrid states are below {states}")
        keys = ((cells[..., 0] * colours + cells[..., 1]) * states + cells[..., 2]) * 2 + self._agent  # [N, 7, 7]
        for key in np.unique(keys[~self._drawn[keys]]):
            self._draw(int(key))
        tiles = self._lut[keys]  # [N, x, y, t, t, 3]
        return tiles.transpose(0, 2, 3, 1, 4, 5).reshape(len(images), VIEW * t, VIEW * t, 3)  # [N, y*t, x*t, 3]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """`[7, 7, 3]` symbolic view (indexed `[x, y]`) -> `[7*t, 7*t, 3]` uint8 RGB."""
        return self.batch(image[None])[0]


def babyai_ids() -> list[str]:
    """Registered BabyAI and MiniGrid environment ids."""
    import gymnasium as gym  # deferred: optional dependency
    import minigrid  # noqa: F401  # deferred: registers the environments

    return sorted(k for k in gym.registry if k.startswith(("BabyAI-", "MiniGrid-")))


def check_env_id(env_id: str) -> None:
    """Raises ConfigError unless `env_id` is a registered BabyAI / MiniGrid id."""
    try:
        known = babyai_ids()
    except ImportError as exc:
        raise ConfigError(f"task.kind: babyai needs gymnasium and minigrid ({exc}); pip install gymnasium minigrid") from None
    if env_id in known:
        return
    close = difflib.get_close_matches(env_id, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    levels = ", ".join(k for k in known if k.startswith("BabyAI-GoTo"))
    raise ConfigError(
        f"task.env_id={env_id!r} is not a registered BabyAI/MiniGrid environment{hint} "
        f"(e.g. {levels}; all ids start with 'BabyAI-' or 'MiniGrid-')"
    )


class BabyAIAdapter:
    """The observation adapter of a BabyAI / MiniGrid level (see `lora_runtime.rl.tasks.episodic`).

    Args:
        env_id: the level (used in error messages).
        tile_size: pixels per cell of the rendered view.
    """

    def __init__(self, env_id: str, tile_size: int) -> None:
        self.env_id = env_id
        self.vocabulary = VOCABULARY
        self.symbol_vocabulary = symbol_vocabulary()
        self.num_actions = NUM_ACTIONS
        self.render = PovRenderer(tile_size)

    def image(self, obs: dict[str, Any]) -> np.ndarray:
        """`[7*t, 7*t, 3]` uint8 RGB partial view."""
        return self.render(obs["image"])

    def images(self, observations: list[dict[str, Any]]) -> np.ndarray:
        """`[N, 7*t, 7*t, 3]` uint8 RGB partial views of `N` observations, in one pass."""
        return self.render.batch(np.stack([o["image"] for o in observations]))

    def words(self, obs: dict[str, Any]) -> list[str]:
        """The mission's words."""
        return mission_words(obs["mission"], self.env_id)

    def symbols(self, obs: dict[str, Any]) -> list[str]:
        """49 cell words of the partial view (text-only language models)."""
        return symbol_words(obs["image"])

    def expert(self, env: Any) -> Iterator[int]:
        """minigrid's scripted BabyAI expert (`BabyAIBot`) on the reset `env`: its actions."""
        from minigrid.utils.baby_ai_bot import BabyAIBot  # deferred: optional dependency

        bot = BabyAIBot(env.unwrapped)
        while True:
            yield int(bot.replan())


def make_babyai_env(env_id: str, max_episode_steps: int | None = None) -> Any:
    """One environment of the level, without render wrappers (`BabyAIAdapter` draws)."""
    import gymnasium as gym  # deferred: optional dependency
    import minigrid  # noqa: F401  # deferred: registers the environments

    kwargs = {"max_steps": max_episode_steps} if max_episode_steps is not None else {}
    return gym.make(env_id, **kwargs)


class MiniGridAdapter(BabyAIAdapter):
    """A MiniGrid level without BabyAI instructions (e.g. `MiniGrid-Empty-5x5-v0`): the same
    view and mission words, but no scripted expert (minigrid's `BabyAIBot` plans from the
    BabyAI instructions), so the built-in base starts from its seeded init."""

    expert = None


def has_instructions(env_id: str) -> bool:
    """True when the level carries BabyAI instructions (`env.unwrapped.instrs` after a reset)."""
    env = make_babyai_env(env_id)
    with contextlib.redirect_stdout(io.StringIO()):  # level generation prints rejections
        env.reset(seed=0)
    found = hasattr(env.unwrapped, "instrs")
    env.close()
    return found


class BabyAITask(EpisodicTask):
    """`task.kind: babyai`: `task.num_envs` environments of the level `task.env_id`."""

    section = BabyAISection

    @classmethod
    def check(cls, run_cfg: RunConfig) -> None:
        super().check(run_cfg)
        check_env_id(run_cfg.task.env_id)

    @classmethod
    def environment(cls, run_cfg: RunConfig, image_size: int | None) -> tuple[str, Callable[[], Any], BabyAIAdapter]:
        t = run_cfg.task
        if image_size is not None and image_size % VIEW:
            raise ConfigError(
                f"task.kind: babyai renders the {VIEW}x{VIEW} partial view, so actor.builtin.image_size must be a "
                f"multiple of {VIEW} (got {image_size}; e.g. 28 with patch_size 4: one patch per cell)"
            )
        kind = BabyAIAdapter if has_instructions(t.env_id) else MiniGridAdapter
        adapter = kind(t.env_id, (image_size or VIEW) // VIEW)
        return t.env_id, lambda: make_babyai_env(t.env_id, t.max_episode_steps), adapter
