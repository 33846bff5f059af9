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

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lora_runtime.config import ConfigError, EpisodicSection, RunConfig
from lora_runtime.parallel import get_world_size, rank_slice
from lora_runtime.rl.models import BOS, PAD, ModelFamily, ModelInputs
from lora_runtime.rl.policy import ActorPolicy
from lora_runtime.rl.supervised import fit
from lora_runtime.rl.tasks.base import Experience, Task
from lora_runtime.rl.tasks.env_worker import EnvWorker
from lora_runtime.rl.tasks.episodes import (
    ExpertPolicy,
    ModelPolicy,
    action_positions,
    draw_seeds,
    held_out_seeds,
    quiet,
    random_baseline,
    run_episodes,
)
from lora_runtime.rl.tasks.overlapped import play_episodes, play_steps

EPISODE_LIMIT = 10_000  # a cap for environments without a time limit
WARMUP_STEPS = 20  # the behaviour cloning's learning-rate warm-up
DEMO_SEED_OFFSET = 20_000  # the expert's episodes draw their seeds from actor.builtin.seed + this


class EpisodicTask(Task):
    """Environments plus adapter, sized for one actor: the base of the gymnasium tasks
    (`babyai`, `gym`), which differ only in how they make an environment and its adapter.

    Rollouts: `num_groups` training seeds from the trainer's generator, each played
    `group_size` times (same layout and mission, different sampled actions); every step of
    an episode is a row of the `Experience`, the episode's return its group's input.

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
        family: the actor's model family (None: no model calls, e.g. for the expert alone).
        cfg: the task section (bc_episodes, eval_episodes for the warm start and `evaluate`).

    Raises:
        ConfigError: an action space that is not Discrete, or a vocabulary too small.
    """

    section = EpisodicSection
    splits_over_ranks = False  # see `splits`: with PPO only
    split_hint = "algorithm.name: ppo (fixed-length rollouts) or runner.distributed: none"
    held_out_eval = True
    steps_environments = True

    def __init__(self, name: str, make_env: Callable[[], Any], adapter: Any, num_envs: int, vocab_size: int,
                 image_size: int | None, max_episode_steps: int | None = None, prev_action: bool = False,
                 family: ModelFamily | None = None, cfg: EpisodicSection | None = None) -> None:
        import gymnasium as gym  # deferred: optional dependency

        self.name, self.adapter, self.num_envs, self.image_size = name, adapter, num_envs, image_size
        self.env = gym.vector.SyncVectorEnv([make_env] * num_envs)
        space = self.env.single_action_space
        if not isinstance(space, gym.spaces.Discrete):
            raise ConfigError(f"task {name!r}: the action space is {space}; only Discrete(K) action spaces map to action tokens")
        self.num_actions_per_step = int(space.n)
        self.max_episode_steps = max_episode_steps or EPISODE_LIMIT
        self.family, self.cfg = family, cfg
        # With fixed shapes (a compiled actor) every forward sees all environments and prompts
        # padded to `prompt_width` (the model's longest text), so it compiles once.
        self.fixed_shapes, self.prompt_width = False, None
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
        # Under torchrun (PPO) this rank steps environments `env_rows` of `global_num_envs`.
        self.env_rows, self.global_num_envs = slice(0, num_envs), num_envs
        self._worker: EnvWorker | None = None

    def env_worker(self) -> EnvWorker | None:
        """The child process that steps the environments (`task.overlap_envs`), started on
        first use and stopped with the task (or at exit); None when the option is off."""
        if self.cfg is None or not getattr(self.cfg, "overlap_envs", False):
            return None
        if self._worker is None or not self._worker.alive:
            self._worker = EnvWorker(self.env.envs, self.name)
            weakref.finalize(self, self._worker.close)
        return self._worker

    @classmethod
    def environment(cls, run_cfg: RunConfig, image_size: int | None) -> tuple[str, Callable[[], Any], Any]:
        """`(name, make_env, adapter)` of the task's environments for an actor reading images of
        `image_size` (None: words). What the gymnasium tasks differ in.

        Raises:
            ConfigError: the environment does not fit the actor.
        """
        raise NotImplementedError

    @classmethod
    def check(cls, run_cfg: RunConfig) -> None:
        super().check(run_cfg)
        if getattr(run_cfg.task, "overlap_envs", False):
            if run_cfg.runner.distributed != "none":
                raise ConfigError(f"task.overlap_envs=true is not supported with runner.distributed="
                                  f"{run_cfg.runner.distributed!r} (the ranks draw their sampling noise for all "
                                  "environments at once); set task.overlap_envs: false")
            if run_cfg.runner.compile:
                raise ConfigError("task.overlap_envs=true cannot be used with runner.compile=true (the compiled actor "
                                  "sees every environment at every step; the overlap acts for half of them at a "
                                  "time); set one of them false")

    @classmethod
    def build(cls, run_cfg: RunConfig, model: nn.Module, family: ModelFamily) -> EpisodicTask:
        """The task of `run_cfg.task` for `model`: images for the built-in actor, words otherwise."""
        cls.check(run_cfg)
        t = run_cfg.task
        if t.num_envs % get_world_size():
            raise ConfigError(f"task.num_envs={t.num_envs} cannot be split over {get_world_size()} ranks; "
                              f"use a multiple of {get_world_size()}")
        name, make_env, adapter = cls.environment(run_cfg, family.image_size(model))
        envs = rank_slice(t.num_envs)  # this rank's environments (all of them in one process)
        with quiet():
            task = cls(name, make_env, adapter, envs.stop - envs.start, family.vocab_size(model),
                       family.image_size(model), t.max_episode_steps, t.prev_action, family, t)
        task.prompt_width = family.max_prompt_len(model)
        task.env_rows, task.global_num_envs = envs, t.num_envs
        return task

    @classmethod
    def splits(cls, run_cfg: RunConfig) -> bool:
        """PPO's fixed-length rollouts split over torchrun ranks (each rank steps its share of
        `task.num_envs`); GRPO's whole episodes do not (their lengths differ between ranks)."""
        return run_cfg.algorithm.name == "ppo"

    @property
    def title(self) -> str:
        return self.name

    @property
    def num_actions(self) -> int:
        return 1  # one action token per environment step

    def describe(self) -> str:
        return (f"{self.name}: {self.num_envs} environments, {self.num_actions_per_step} action tokens, "
                f"{'view as ' + str(self.image_size) + 'px image' if self.image_size else 'view as words'} + mission")

    def ids(self, words: Sequence[str], what: str) -> list[int]:
        try:
            return [self.word_ids[w] for w in words]
        except KeyError as exc:
            raise ConfigError(f"task {self.name!r}: the {what} word {exc.args[0]!r} is not in the adapter's vocabulary") from None

    def encode(self, observations: Sequence[Any], previous: Sequence[int] | None = None) -> ModelInputs:
        """Observations -> an `ModelInputs` (CPU tensors).

        `previous`: with `prev_action`, each environment's previous action (-1 or None: an
        episode's first step), appended to the prompt as its action token (BOS for -1).
        """
        prompts = [[BOS] + self.ids(self.adapter.words(o), "instruction") for o in observations]
        if self.prev_action:
            previous = [-1] * len(prompts) if previous is None else previous
            prompts = [p + [int(self.action_ids[a]) if a >= 0 else BOS] for p, a in zip(prompts, previous)]
        width = max(len(p) for p in prompts)
        if self.fixed_shapes and self.prompt_width is not None:
            if width > self.prompt_width:
                raise ConfigError(f"task {self.name!r}: a prompt of {width} tokens is longer than the model's "
                                  f"{self.prompt_width} (actor.builtin.max_text_len)")
            width = self.prompt_width
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
        return ModelInputs(pixels, symbols, prompt_ids, lengths)

    def split(self, batched: Any) -> list[Any]:
        """A vector environment's batched observation -> one observation per environment."""
        from gymnasium.vector.utils import iterate  # deferred: optional dependency

        return list(iterate(self.env.observation_space, batched))

    def example_inputs(self) -> ModelInputs:
        with quiet():
            observations, _ = self.env.reset(seed=0)
        return self.encode(self.split(observations))

    @torch.no_grad()
    def collect(self, policy: ActorPolicy, num_groups: int, group_size: int, generator: torch.Generator) -> Experience:
        """Whole episodes, seed-grouped. Reproducible: the same generator state gives the same
        seeds, actions and returns."""
        seeds = [s for s in draw_seeds(generator, num_groups) for _ in range(group_size)]
        eps = play_episodes(self, seeds, ModelPolicy(policy, generator, False, self.fixed_shapes))
        stats = {**eps.stats(), "reward_std": eps.returns.std().item()}
        return Experience(eps.obs, action_positions(eps.obs), eps.actions[:, None], eps.logp[:, None],
                          stats, int(stats["env_steps"]), episode=eps.episode, returns=eps.returns,
                          group_size=group_size, drop_flat_groups=True)

    @torch.no_grad()
    def collect_steps(self, policy: ActorPolicy, steps: int, generator: torch.Generator) -> Experience:
        """`steps` steps of every environment with values (PPO; see `episodes.run_steps`; with
        `task.overlap_envs`, `overlapped.run_steps_overlapped`)."""
        st = play_steps(self, policy, steps, generator)
        return Experience(st.obs, action_positions(st.obs), st.actions[:, None], st.logp[:, None], st.stats(),
                          int(st.actions.numel()), values=st.values, next_values=st.next_values,
                          rewards=st.rewards, terminated=st.terminated, ended=st.ended)

    def evaluate(self, model: nn.Module, episodes: int | None, device: torch.device | str = "cpu") -> dict[str, Any]:
        """Greedy success rate, mean return and length over the first held-out seeds.

        Args:
            model: the actor (left in eval mode).
            episodes: how many held-out seeds (None: `task.eval_episodes`).
            device: where the model runs.

        Returns:
            `{"success_rate", "reward_mean", "episode_len", "episodes", "first_seed", ...}`.
        """
        n = episodes or self.cfg.eval_episodes
        model.eval()
        seeds = held_out_seeds(n)
        policy = ActorPolicy(model, self.family, self.action_ids.to(device), 1.0)
        with torch.no_grad():
            result = play_episodes(self, seeds, ModelPolicy(policy, None, True, self.fixed_shapes), record=False)
        return {**result.stats(), "episodes": n, "first_seed": seeds[0]}

    def evaluate_random(self, episodes: int | None) -> dict[str, Any]:
        """The uniformly random policy on the same held-out seeds as `evaluate`."""
        n = episodes or self.cfg.eval_episodes
        return {**random_baseline(self, n), "episodes": n, "first_seed": held_out_seeds(1)[0]}

    def warm_start(self, model: nn.Module, run_cfg: RunConfig, log: Callable[[str], None]) -> dict[str, Any]:
        """Behaviour cloning from the adapter's expert (BabyAI: minigrid's `BabyAIBot`).

        The expert plays `task.bc_episodes` episodes on training seeds; the actor learns its
        actions by cross-entropy over the action tokens at each step, for
        `actor.builtin.pretrain_steps` AdamW steps (`supervised.fit`). Then the warm start's
        greedy held-out success and the random policy's are measured and kept in the report.
        """
        if not callable(getattr(self.adapter, "expert", None)):
            log("the task's adapter has no expert(env): the base is the seeded init, without a warm start")
            return {"steps": 0, "note": "no expert: no warm start"}
        b, t = run_cfg.actor.builtin, run_cfg.task
        with torch.random.fork_rng(devices=[]):
            gen = torch.Generator().manual_seed(DEMO_SEED_OFFSET + b.seed)
            demos = run_episodes(self, draw_seeds(gen, t.bc_episodes), ExpertPolicy(self.adapter))
            n = len(demos.actions)
            log(f"warm start: {t.bc_episodes} expert episodes, {n} steps (expert success "
                f"{demos.stats()['success_rate']:.3f}); behaviour cloning for {b.pretrain_steps} steps")
            last = action_positions(demos.obs)[:, 0]  # [n]

            def loss_at(step: int) -> torch.Tensor:
                idx = torch.randint(0, n, (min(b.pretrain_batch_size, n),), generator=gen)  # [b]
                logits = self.family.logits(model, demos.obs.select(idx))  # [b, T, V]
                logits = logits[torch.arange(len(idx)), last[idx]].index_select(-1, self.action_ids)  # [b, K]
                return F.cross_entropy(logits.float(), demos.actions[idx])

            loss = fit(model, b.pretrain_steps, b.pretrain_lr, WARMUP_STEPS, loss_at)
            warm = self.evaluate(model, t.eval_episodes)
            rand = random_baseline(self)
        log(f"warm start: loss {loss:.4f}; greedy held-out success {warm['success_rate']:.3f} "
            f"(return {warm['reward_mean']:.3f}); random policy {rand['success_rate']:.3f} (return {rand['reward_mean']:.3f})")
        return {
            "demo_episodes": t.bc_episodes, "demo_steps": n, "expert_success": round(demos.stats()["success_rate"], 5),
            "steps": b.pretrain_steps, "final_loss": round(loss, 5),
            "warm_start_success": round(warm["success_rate"], 5), "warm_start_return": round(warm["reward_mean"], 5),
            "eval_episodes": t.eval_episodes,
            "random_success": round(rand["success_rate"], 5), "random_return": round(rand["reward_mean"], 5),
        }

    def measure_levels(self, base_report: dict[str, Any] | None, base: Callable[[], nn.Module]) -> None:
        """The random policy's mean return (`chance_reward`) and success, and the warm start's
        greedy held-out success (from the built-in base's report; measured again when the
        base was cached with another `task.eval_episodes`, which is not part of its hash)."""
        rand = random_baseline(self)
        self.chance_reward = rand["reward_mean"]
        self.levels = {"random_success": rand["success_rate"]}
        report = dict(base_report or {})
        if "warm_start_success" in report and report.get("eval_episodes") != self.cfg.eval_episodes:
            with torch.random.fork_rng(devices=[]):
                report["warm_start_success"] = round(self.evaluate(base(), None)["success_rate"], 5)
        if "warm_start_success" in report:
            self.levels["warm_start_success"] = report["warm_start_success"]
