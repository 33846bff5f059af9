"""The synthetic embodied task: reach the object the instruction names.

A scene is a `grid x grid` board holding `num_objects` objects, each a different colour out
of `num_colors`, each in its own cell. It is shown to the actor two ways: as an RGB image
(one cell = `image_size / grid` pixels, with Gaussian pixel noise) for the built-in actor,
and as one token per cell for text-only language models. The instruction is
`[BOS, GO, <colour>]`; the actor answers with two action tokens, row then column, drawn
from the last `grid` ids of the vocabulary (as OpenVLA keeps actions at the end).

Reward: 1.0 when (row, column) is the named object's cell, else 0.0 — verifiable from the
scene. Both inputs are needed: the text says which colour, only the image says where.

Chance: a policy that ignores both inputs and picks a cell uniformly scores exactly
`1 / grid**2` (0.0625 on the default 4x4 board); one that sees the image but not the text
can do no better than `1 / num_objects` (pick one of the objects).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lora_runtime.config import ConfigError, ReachSection, RunConfig
from lora_runtime.rl.models import ModelFamily, ModelInputs
from lora_runtime.rl.policy import ActorPolicy, gumbel_sample
from lora_runtime.rl.seeding import base_seeds
from lora_runtime.rl.tasks.base import Experience, Task
from lora_runtime.rl.tasks.reach_warm_start import clear_action_rows, pretrain_base

# RGB of each colour word, in token order.
PALETTE: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("red", (0.9, 0.1, 0.1)),
    ("green", (0.1, 0.8, 0.2)),
    ("blue", (0.15, 0.3, 0.95)),
    ("yellow", (0.95, 0.9, 0.1)),
    ("magenta", (0.85, 0.2, 0.85)),
    ("cyan", (0.1, 0.85, 0.9)),
    ("orange", (1.0, 0.55, 0.05)),
    ("white", (0.95, 0.95, 0.95)),
)
BACKGROUND = 0.1
NUM_ACTION_TOKENS = 2  # row, column


@dataclass(frozen=True)
class TokenLayout:
    """Where the task's words live in an actor's vocabulary.

    `0` is left for padding; then BOS, GO, WHERE, one word per colour, one scene token per
    cell state (empty or a colour; text-only actors read the board this way), one number
    word per row/column index (the built-in base's pretraining answers, see
    `lora_runtime.rl.tasks.reach_warm_start`); the action tokens are the last `grid` ids.
    """

    vocab_size: int
    bos: int
    go: int
    where: int
    colors: tuple[int, ...]
    scene: tuple[int, ...]
    numbers: tuple[int, ...]
    actions: tuple[int, ...]

    @staticmethod
    def for_vocab(vocab_size: int, grid: int, num_colors: int) -> TokenLayout:
        """The layout for a vocabulary of `vocab_size` ids.

        Raises:
            ConfigError: the vocabulary is too small for the task (names the keys).
        """
        need = 4 + 2 * num_colors + 1 + 2 * grid
        if vocab_size < need:
            raise ConfigError(
                f"task (grid={grid}, num_colors={num_colors}) needs a vocabulary of at least {need} "
                f"token ids, but the actor has vocab_size={vocab_size}; raise actor.builtin.vocab_size "
                "or lower task.num_colors / task.grid"
            )
        c = 4 + num_colors
        return TokenLayout(
            vocab_size=vocab_size,
            bos=1,
            go=2,
            where=3,
            colors=tuple(range(4, c)),
            scene=tuple(range(c, c + num_colors + 1)),
            numbers=tuple(range(c + num_colors + 1, c + num_colors + 1 + grid)),
            actions=tuple(range(vocab_size - grid, vocab_size)),
        )


@dataclass
class Scenes:
    """A batch of `B` scenes with their instructions and answers."""

    pixel_values: torch.Tensor  # [B, 3, H, W] in [0, 1]
    scene_ids: torch.Tensor  # [B, grid * grid] one token per cell (text-only actors)
    prompt_ids: torch.Tensor  # [B, 3] = BOS, GO, colour word
    target: torch.Tensor  # [B, 2] (row, column) of the named object

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def to(self, device: torch.device | str) -> Scenes:
        return Scenes(*(t.to(device) for t in (self.pixel_values, self.scene_ids, self.prompt_ids, self.target)))


class ReachTask(Task):
    """Samples scenes and scores actions.

    Args:
        cfg: the `task` section.
        image_size: side of the rendered image in pixels (the actor's input size).
        vocab_size: the actor's vocabulary size.
        family: the actor's model family (None: scenes only, no rollouts).

    Raises:
        ConfigError: the board does not divide the image, or the vocabulary is too small.
    """

    section = ReachSection

    def __init__(self, cfg: ReachSection, image_size: int, vocab_size: int, family: ModelFamily | None = None) -> None:
        if image_size % cfg.grid:
            raise ConfigError(
                f"task.grid={cfg.grid} does not divide the actor's image size {image_size} "
                "(actor.builtin.image_size); pick a grid that divides it"
            )
        self.cfg = cfg
        self.image_size = image_size
        self.cell = image_size // cfg.grid
        self.tokens = TokenLayout.for_vocab(vocab_size, cfg.grid, cfg.num_colors)
        self.palette = torch.tensor([rgb for _, rgb in PALETTE[: cfg.num_colors]])  # [C, 3]
        self.family = family
        self.action_ids = torch.tensor(self.tokens.actions)  # [grid]
        self.levels = {}

    @classmethod
    def build(cls, run_cfg: RunConfig, model: nn.Module, family: ModelFamily) -> ReachTask:
        image_size = family.image_size(model)  # a text-only model reads one token per cell
        return cls(run_cfg.task, image_size or run_cfg.task.grid, family.vocab_size(model), family)

    @property
    def chance_reward(self) -> float:
        """Expected reward of a uniformly random cell: exactly `1 / grid**2`."""
        return 1.0 / self.cfg.grid**2

    @property
    def title(self) -> str:
        return f"reach {self.cfg.grid}x{self.cfg.grid}"

    @property
    def num_actions(self) -> int:
        return NUM_ACTION_TOKENS

    def describe(self) -> str:
        g, k = self.cfg.grid, self.cfg.num_objects
        return (
            f"reach: {g}x{g} board, {k} objects of {self.cfg.num_colors} colours; "
            f"chance reward {self.chance_reward:.4f} (1/{g * g}); ignoring the instruction caps it at {1 / k:.3f}"
        )

    def sample(self, n: int, generator: torch.Generator) -> Scenes:
        """Draws `n` scenes (CPU tensors) from `generator`."""
        g, k, c = self.cfg.grid, self.cfg.num_objects, self.cfg.num_colors
        cells = torch.rand(n, g * g, generator=generator).argsort(dim=1)[:, :k]  # [n, k] distinct cells
        colors = torch.rand(n, c, generator=generator).argsort(dim=1)[:, :k]  # [n, k] distinct colours
        pick = torch.randint(0, k, (n,), generator=generator)  # [n] which object is named
        rows = torch.arange(n)
        board = torch.full((n, g * g), -1, dtype=torch.long)  # colour per cell, -1 = empty
        board[rows[:, None], cells] = colors
        target_cell = cells[rows, pick]  # [n]
        target = torch.stack([target_cell // g, target_cell % g], dim=1)  # [n, 2]
        noise = torch.randn(n, 3, self.image_size, self.image_size, generator=generator)
        prompt = torch.tensor([self.tokens.bos, self.tokens.go]).expand(n, 2)
        color_word = torch.tensor(self.tokens.colors)[colors[rows, pick]]  # [n]
        return Scenes(
            pixel_values=self.render(board) + self.cfg.noise * noise,
            scene_ids=torch.tensor(self.tokens.scene)[board + 1],
            prompt_ids=torch.cat([prompt, color_word[:, None]], dim=1),
            target=target,
        )

    def render(self, board: torch.Tensor) -> torch.Tensor:
        """`[n, grid*grid]` colour indices (-1 empty) -> `[n, 3, H, W]` noiseless images."""
        n, g = board.shape[0], self.cfg.grid
        rgb = torch.full((n, g * g, 3), BACKGROUND)
        filled = board >= 0
        rgb[filled] = self.palette[board[filled]]
        img = rgb.view(n, g, g, 3).permute(0, 3, 1, 2)  # [n, 3, g, g]
        return img.repeat_interleave(self.cell, dim=2).repeat_interleave(self.cell, dim=3)

    def reward(self, scenes: Scenes, action_bins: torch.Tensor) -> torch.Tensor:
        """1.0 where the (row, column) bins hit the named object's cell.

        Args:
            scenes: `B` scenes.
            action_bins: `[B * G, 2]` bins in `[0, grid)`; rows `i*G ... (i+1)*G - 1`
                answer scene `i`.

        Returns:
            `[B * G]` float rewards.
        """
        group = action_bins.shape[0] // len(scenes)
        target = scenes.target.to(action_bins.device).repeat_interleave(group, dim=0)  # [B*G, 2]
        return (action_bins == target).all(dim=1).float()

    def inputs(self, scenes: Scenes, prompt_ids: torch.Tensor, repeats: int) -> ModelInputs:
        """What the actor reads: the scenes' images (or boards as words) and `[B*repeats, T]` prompts."""
        lengths = torch.full((prompt_ids.shape[0],), prompt_ids.shape[1], device=prompt_ids.device)
        return ModelInputs(scenes.pixel_values, scenes.scene_ids, prompt_ids, lengths, repeats)

    def example_inputs(self) -> ModelInputs:
        scenes = self.sample(2, torch.Generator().manual_seed(0))
        actions = torch.full((2, NUM_ACTION_TOKENS - 1), self.tokens.actions[0])  # placeholders: causal logits
        return self.inputs(scenes, torch.cat([scenes.prompt_ids, actions], dim=1), 1)  # [2, 3 + A - 1]

    @torch.no_grad()
    def collect(self, policy: ActorPolicy, num_groups: int, group_size: int, generator: torch.Generator) -> Experience:
        """`num_groups` scenes, `group_size` answers each, sampled one action token at a time."""
        action_ids = policy.action_ids
        device = action_ids.device
        scenes = self.sample(num_groups, generator).to(device)
        ids = scenes.prompt_ids.repeat_interleave(group_size, dim=0)  # [B*G, 3]
        bins, logps = [], []
        for i in range(NUM_ACTION_TOKENS):
            last = torch.full((len(ids), 1), ids.shape[1] - 1, device=device)  # [B*G, 1]
            logp = policy(self.inputs(scenes, ids, group_size), last)[0][:, 0]  # [B*G, K]
            choice = gumbel_sample(logp, generator)  # [B*G]
            bins.append(choice)
            logps.append(logp.gather(-1, choice[:, None])[:, 0])
            if i + 1 < NUM_ACTION_TOKENS:
                ids = torch.cat([ids, action_ids[choice][:, None]], dim=1)  # [B*G, T + 1]
        rewards = self.reward(scenes, torch.stack(bins, dim=1))  # [B*G]
        t = ids.shape[1]
        positions = torch.arange(t - NUM_ACTION_TOKENS, t, device=device).expand(len(ids), -1)  # [B*G, A]
        return Experience(self.inputs(scenes, ids, group_size), positions, torch.stack(bins, dim=1),
                          torch.stack(logps, dim=1),
                          {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item()}, len(ids),
                          episode=torch.arange(len(ids), device=device), returns=rewards, group_size=group_size)

    def warm_start(self, model: nn.Module, run_cfg: RunConfig, log: Callable[[str], None]) -> dict[str, Any]:
        """The built-in base learns "where is <colour>?" in number words, never the action tokens
        (`reach_warm_start`); then the action tokens' output rows are zeroed."""
        b = run_cfg.actor.builtin
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(base_seeds(b.seed)[1])  # nothing in the warm start draws unseeded
            report = pretrain_base(model, self, b.pretrain_steps, b.pretrain_batch_size, b.pretrain_lr, b.seed).as_dict()
        clear_action_rows(model, self)
        log(f"base warm start: loss {report['final_loss']:.4f}, 'where is' accuracy {report['accuracy']:.3f}")
        return report
