"""Multi-step tasks: gymnasium environments, stepped together, read through an adapter.

An *observation adapter* turns one observation of the environment into what the actor reads.
It is any object with:

- `vocabulary: Sequence[str]`: every word `words` may return;
- `symbol_vocabulary: Sequence[str]` (optional): every word `symbols` may return;
- `image(obs) -> np.ndarray` `[H, W, 3]` uint8 RGB (the built-in actor's input; `H == W ==
  actor.builtin.image_size`);
- `images(observations) -> np.ndarray` (optional): `[N, H, W, 3]`, the same as `image` on
  each, in one call (faster, used when present);
- `words(obs) -> list[str]`: the instruction, in `vocabulary` words;
- `symbols(obs) -> list[str]` (optional): the observation as words, for text-only language
  models (`actor.model.model_path`), always the same number of words;
- `expert(env) -> Iterator[int]` (optional): a scripted expert's actions for the warm start
  of the built-in actor (behaviour cloning), given the (reset) environment.

The environment's action space must be `Discrete(K)`: action `k` is the `k`-th of the last
`K` token ids of the actor's vocabulary (as OpenVLA keeps actions at the end).

Token ids: 0 pads, 1 is BOS, then the adapter's words (and symbol words for language models),
then the action tokens. A prompt is `[BOS, words...]`, right-padded; the action is read at the
last word. With `task.prev_action` the prompt ends with one more token, the environment's
previous action (BOS at an episode's first step), and the action is read there: a policy
with this one step of memory can act differently in the same view (a greedy memoryless
policy that turns left, then right, sees the same view again and loops forever).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lora_runtime.config import ConfigError

PAD, BOS = 0, 1
TRAIN_SEED_LIMIT = 2**30  # training and warm-start episodes use seeds below this ...
HELD_OUT_SEED = 2**30  # ... evaluation uses HELD_OUT_SEED, HELD_OUT_SEED + 1, ...
EpisodeLimit = 10_000  # a cap for environments without a time limit


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silences stdout (minigrid prints "Sampling rejected: ..." while generating levels)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


@dataclass
class ObsBatch:
    """`N` encoded observations."""

    pixels: torch.Tensor | None  # [N, 3, H, W] uint8 (built-in actor), else None
    symbol_ids: torch.Tensor | None  # [N, S] (text-only language models), else None
    prompt_ids: torch.Tensor  # [N, T] BOS + instruction, right-padded with PAD
    lengths: torch.Tensor  # [N] prompt lengths (the action is read at lengths - 1)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ObsBatch:
        return ObsBatch(*(None if t is None else fn(t) for t in (self.pixels, self.symbol_ids, self.prompt_ids, self.lengths)))

    def to(self, device: torch.device | str) -> ObsBatch:
        return self._map(lambda t: t.to(device))

    def select(self, index: torch.Tensor | slice) -> ObsBatch:
        """The observations at `index` (rows)."""
        return self._map(lambda t: t[index])

    @staticmethod
    def cat(batches: Sequence[ObsBatch]) -> ObsBatch:
        """Concatenates batches (prompts padded to the longest)."""
        width = max(b.prompt_ids.shape[1] for b in batches)
        prompts = [torch.nn.functional.pad(b.prompt_ids, (0, width - b.prompt_ids.shape[1]), value=PAD) for b in batches]

        def join(name: str) -> torch.Tensor | None:
            parts = [getattr(b, name) for b in batches]
            return None if parts[0] is None else torch.cat(parts)

        return ObsBatch(join("pixels"), join("symbol_ids"), torch.cat(prompts), join("lengths"))


class EpisodicTask:
    """Environments plus adapter, sized for one actor.

    Args:
        name: what `describe()` calls the task (e.g. the level id).
        make_env: builds one fresh environment (called `num_envs` times).
        adapter: the observation adapter (protocol above).
        num_envs: environments stepped together (gymnasium's `SyncVectorEnv`).
        vocab_size: the actor's vocabulary size.
        image_size: the built-in actor's image side, or None for a text-only language model.
        max_episode_steps: a cap on episode length (None: the environment's own limit).
        prev_action: end each prompt with the environment's previous action token (BOS at
            an episode's first step): one step of memory, so a greedy policy can break loops.

    Raises:
        ConfigError: an action space that is not Discrete, or a vocabulary too small.
    """

    def __init__(self, name: str, make_env: Callable[[], Any], adapter: Any, num_envs: int, vocab_size: int,
                 image_size: int | None, max_episode_steps: int | None = None, prev_action: bool = False) -> None:
        import gymnasium as gym  # deferred: optional dependency

        self.name, self.adapter, self.num_envs, self.image_size = name, adapter, num_envs, image_size
        self.env = gym.vector.SyncVectorEnv([make_env] * num_envs)
        space = self.env.single_action_space
        if not isinstance(space, gym.spaces.Discrete):
            raise ConfigError(f"task {name!r}: the action space is {space}; only Discrete(K) action spaces map to action tokens")
        self.num_actions_per_step = int(space.n)
        self.max_episode_steps = max_episode_steps or EpisodeLimit
        words = list(adapter.vocabulary)
        if image_size is None:
            if not hasattr(adapter, "symbols"):
                raise ConfigError(f"task {name!r}: a text-only language model needs an adapter with symbols(obs)")
            words += [w for w in getattr(adapter, "symbol_vocabulary", ()) if w not in set(words)]
        need = 2 + len(words) + self.num_actions_per_step
        if vocab_size < need:
            raise ConfigError(
                f"task {name!r} needs a vocabulary of at least {need} token ids (pad, BOS, {len(words)} words, "
                f"{self.num_actions_per_step} actions), but the actor has vocab_size={vocab_size}; raise "
                "actor.builtin.vocab_size (built-in actor) or use a model_path with a larger vocabulary"
            )
        self.word_ids = {w: 2 + i for i, w in enumerate(words)}
        self.action_ids = torch.arange(vocab_size - self.num_actions_per_step, vocab_size)  # [K]
        self.chance_reward = float("nan")  # the random policy's mean return, set by whoever measures it
        self.levels: dict[str, float] = {}  # reference success rates written into every metrics line
        self.prev_action = prev_action  # the prompt ends with the previous action's token

    @property
    def num_actions(self) -> int:
        return 1  # one action token per environment step

    def describe(self) -> str:
        return (f"{self.name}: {self.num_envs} environments, {self.num_actions_per_step} action tokens, "
                f"{'RGB partial view ' + str(self.image_size) + 'px' if self.image_size else 'view as words'} + mission")

    def ids(self, words: Sequence[str], what: str) -> list[int]:
        try:
            return [self.word_ids[w] for w in words]
        except KeyError as exc:
            raise ConfigError(f"task {self.name!r}: the {what} word {exc.args[0]!r} is not in the adapter's vocabulary") from None

    def encode(self, observations: Sequence[Any], previous: Sequence[int] | None = None) -> ObsBatch:
        """Observations -> an `ObsBatch` (CPU tensors).

        `previous`: with `prev_action`, each environment's previous action (-1 or None: an
        episode's first step), appended to the prompt as its action token (BOS for -1).
        """
        prompts = [[BOS] + self.ids(self.adapter.words(o), "instruction") for o in observations]
        if self.prev_action:
            previous = [-1] * len(prompts) if previous is None else previous
            prompts = [p + [int(self.action_ids[a]) if a >= 0 else BOS] for p, a in zip(prompts, previous)]
        width = max(len(p) for p in prompts)
        prompt_ids = torch.tensor([p + [PAD] * (width - len(p)) for p in prompts])  # [N, T]
        lengths = torch.tensor([len(p) for p in prompts])  # [N]
        pixels = symbols = None
        if self.image_size is not None:
            if hasattr(self.adapter, "images"):  # a batched renderer, when the adapter has one
                images = np.asarray(self.adapter.images(observations))  # [N, H, W, 3]
            else:
                images = np.stack([self.adapter.image(o) for o in observations])  # [N, H, W, 3]
            if images.shape[1:] != (self.image_size, self.image_size, 3) or images.dtype != np.uint8:
                raise ConfigError(
                    f"task {self.name!r}: the adapter's image is {images.dtype} {tuple(images.shape[1:])}, the built-in "
                    f"actor reads uint8 ({self.image_size}, {self.image_size}, 3) (actor.builtin.image_size)"
                )
            pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W]
        else:
            symbols = torch.tensor([self.ids(self.adapter.symbols(o), "observation") for o in observations])  # [N, S]
        return ObsBatch(pixels, symbols, prompt_ids, lengths)

    def split(self, batched: Any) -> list[Any]:
        """A vector environment's batched observation -> one observation per environment."""
        from gymnasium.vector.utils import iterate  # deferred: optional dependency

        return list(iterate(self.env.observation_space, batched))
