"""Whole episodes, batched over environments: the rollouts of the multi-step tasks.

`run_episodes(task, seeds, policy)` resets the task's vector environment with one seed per
environment (a seed fixes the level's layout and mission), steps every environment that is
still running with one batched policy call per step, and stops when all have ended
(terminated or truncated). More seeds than environments run in rounds. The recorded steps
are flat (`S` steps of `E` episodes); `Episodes.episode` maps each step to its episode.

Policies: `ModelPolicy` (the actor: sampled with Gumbel noise from a CPU generator, or
greedy), `UniformPolicy` (the random baseline), `ExpertPolicy` (the adapter's scripted
expert, for behaviour cloning).
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lora_runtime.rl.models import ModelInputs
from lora_runtime.rl.policy import ActorPolicy, gumbel_sample

TRAIN_SEED_LIMIT = 2**30  # training and warm-start episodes use seeds below this ...
HELD_OUT_SEED = 2**30  # ... evaluation uses HELD_OUT_SEED, HELD_OUT_SEED + 1, ...
BASELINE_EPISODES = 32
EpisodicTask = Any  # `lora_runtime.rl.tasks.episodic.EpisodicTask` (which imports this module)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silences stdout (minigrid prints "Sampling rejected: ..." while generating levels)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def action_positions(obs: ModelInputs) -> torch.Tensor:
    """`[N, 1]`: each prompt's last token, where the step's one action token is read."""
    return (obs.lengths - 1)[:, None]


@dataclass
class Episodes:
    """`E` finished episodes and their `S` recorded steps."""

    obs: ModelInputs | None  # S observations (None when not recorded)
    episode: torch.Tensor  # [S] long, the episode of each step
    actions: torch.Tensor  # [S] long, action index in [0, K)
    logp: torch.Tensor  # [S] log-prob of the action under the acting policy
    returns: torch.Tensor  # [E] float, sum of rewards
    lengths: torch.Tensor  # [E] long, environment steps
    seeds: list[int]
    rollout_s: float = 0.0

    @property
    def success(self) -> torch.Tensor:
        """`[E]` bool: the episode earned a positive return (BabyAI: reached the goal)."""
        return self.returns > 0

    def stats(self) -> dict[str, float]:
        steps = int(self.lengths.sum())
        return {
            "success_rate": self.success.float().mean().item(),
            "reward_mean": self.returns.mean().item(),
            "episode_len": self.lengths.float().mean().item(),
            "env_steps": steps,
            "rollout_s": self.rollout_s,
            "env_steps_per_s": steps / max(self.rollout_s, 1e-9),
        }


class ModelPolicy:
    """The actor as a policy: one batched forward per environment step (call under no_grad).

    Args:
        policy: the actor's `ActorPolicy` (model, family, action ids, temperature).
        generator: CPU generator of the Gumbel noise (unused when greedy).
        greedy: take the most likely action instead of sampling.
        fixed_rows: run the model on every environment at every step (the finished ones
            on their last observation, results dropped), so its input shapes never change
            and a compiled model compiles once; the actions drawn are the same.
    """

    needs_obs = True

    def __init__(self, policy: ActorPolicy, generator: torch.Generator | None, greedy: bool,
                 fixed_rows: bool = False) -> None:
        self.policy, self.generator, self.greedy, self.fixed_rows = policy, generator, greedy, fixed_rows

    def start(self, index: int, env: Any) -> None:
        """Called after each reset of environment `index`."""

    def act(self, obs: ModelInputs | None, active: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.policy.action_ids.device
        logp = self.policy(obs.to(device), action_positions(obs).to(device))[0][:, 0].cpu()  # [n, K]
        if self.fixed_rows:
            logp = logp[torch.as_tensor(active)]  # [a, K] the running environments' rows
        choice = logp.argmax(dim=-1) if self.greedy else gumbel_sample(logp, self.generator)  # [a]
        return choice, logp.gather(-1, choice[:, None])[:, 0]


class UniformPolicy:
    """Every action with probability 1/K, drawn from `generator`."""

    needs_obs = False

    def __init__(self, num_actions: int, generator: torch.Generator) -> None:
        self.k, self.generator = num_actions, generator

    def start(self, index: int, env: Any) -> None:
        """Nothing to set up."""

    def act(self, obs: ModelInputs | None, active: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        choice = torch.randint(0, self.k, (len(active),), generator=self.generator)
        return choice, torch.full((len(active),), -float(np.log(self.k)))


class ExpertPolicy:
    """The adapter's scripted expert (`adapter.expert(env)`), one per environment."""

    needs_obs = False
    reads_envs = True  # the expert reads the environment objects: they stay in this process

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self.experts: dict[int, Any] = {}

    def start(self, index: int, env: Any) -> None:
        self.experts[index] = self.adapter.expert(env)

    def act(self, obs: ModelInputs | None, active: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor([next(self.experts[i]) for i in active]), torch.zeros(len(active))


def draw_seeds(generator: torch.Generator, n: int) -> list[int]:
    """`n` training seeds (below `TRAIN_SEED_LIMIT`, so never a held-out one) from `generator`."""
    return torch.randint(0, TRAIN_SEED_LIMIT, (n,), generator=generator).tolist()


def held_out_seeds(n: int) -> list[int]:
    """The evaluation seeds: `HELD_OUT_SEED + i`, disjoint from every training seed."""
    return [HELD_OUT_SEED + i for i in range(n)]


def run_episodes(task: EpisodicTask, seeds: Sequence[int], policy: Any, record: bool = True) -> Episodes:
    """Plays one episode per seed, `task.num_envs` at a time.

    Args:
        task: the environments and their adapter.
        seeds: `E` reset seeds (the same seed twice gives the same layout and mission).
        policy: `ModelPolicy`, `UniformPolicy` or `ExpertPolicy` (see the module doc).
        record: keep every step's observation, action and log-prob (training, demonstrations).

    Returns:
        The `E` episodes, in the order of `seeds`. (`overlapped.play_episodes` steps the
        environments in a child process instead when `task.overlap_envs` is set.)
    """
    start = time.perf_counter()
    width, env = task.num_envs, task.env
    obs_parts: list[ModelInputs] = []
    ep_parts, act_parts, logp_parts = [], [], []
    returns = np.zeros(len(seeds))
    lengths = np.zeros(len(seeds), dtype=np.int64)
    for first in range(0, len(seeds), width):
        chunk = list(seeds[first:first + width])
        padded = chunk + [chunk[-1]] * (width - len(chunk))  # spare environments run no episode
        with quiet():
            batched, _ = env.reset(seed=padded)
        for i in range(len(chunk)):
            policy.start(i, env.envs[i])
        active = list(range(len(chunk)))
        previous = np.full(width, -1, dtype=np.int64)  # [width] each environment's last action (-1: none yet)
        while active:
            per_env = task.split(batched)
            every = getattr(policy, "fixed_rows", False)
            rows = list(range(width)) if every else active
            if record or policy.needs_obs:
                obs = task.encode([per_env[i] for i in rows], previous[rows] if task.prev_action else None)
            else:
                obs = None
            choice, logp = policy.act(obs, active)
            if every and obs is not None:
                obs = obs.select(torch.as_tensor(active))
            actions = np.zeros(width, dtype=np.int64)
            actions[active] = choice.numpy()
            previous[active] = actions[active]
            with quiet():  # an autoreset may generate a level
                batched, reward, terminated, truncated, _ = env.step(actions)
            idx = np.asarray(active) + first
            returns[idx] += reward[active]
            lengths[idx] += 1
            if record:
                obs_parts.append(obs)
                ep_parts.append(torch.from_numpy(idx))
                act_parts.append(choice)
                logp_parts.append(logp)
            ended = terminated | truncated  # [width]
            ended[: len(chunk)] |= lengths[first:first + len(chunk)] >= task.max_episode_steps
            active = [i for i in active if not ended[i]]
    empty = torch.zeros(0, dtype=torch.long)
    return Episodes(
        obs=ModelInputs.cat(obs_parts) if record else None,
        episode=torch.cat(ep_parts) if record else empty,
        actions=torch.cat(act_parts) if record else empty,
        logp=torch.cat(logp_parts) if record else torch.zeros(0),
        returns=torch.from_numpy(returns).float(),
        lengths=torch.from_numpy(lengths),
        seeds=list(seeds),
        rollout_s=time.perf_counter() - start,
    )


def random_baseline(task: EpisodicTask, episodes: int = BASELINE_EPISODES) -> dict[str, float]:
    """Success rate and mean return of the uniformly random policy on the first held-out seeds."""
    policy = UniformPolicy(task.num_actions_per_step, torch.Generator().manual_seed(0))
    return run_episodes(task, held_out_seeds(episodes), policy, record=False).stats()


@dataclass
class Steps:
    """`T` steps of each of `M` environments (PPO's rollout), rows t-major (`t * M + m`)."""

    obs: ModelInputs  # T * M observations
    actions: torch.Tensor  # [T * M] long
    logp: torch.Tensor  # [T * M]
    values: torch.Tensor  # [T, M] value of each step's state
    next_values: torch.Tensor  # [T, M] value of the state reached (the final one when the episode ended)
    rewards: torch.Tensor  # [T, M]
    terminated: torch.Tensor  # [T, M] bool
    ended: torch.Tensor  # [T, M] bool: terminated or truncated (time limit, task.max_episode_steps)
    returns: list[float]  # returns of the episodes that ended in the rollout
    lengths: list[int]  # their lengths
    rollout_s: float = 0.0

    def stats(self) -> dict[str, float]:
        done = len(self.returns)
        steps = int(self.actions.numel())
        nan = float("nan")
        return {
            "success_rate": sum(r > 0 for r in self.returns) / done if done else nan,
            "reward_mean": sum(self.returns) / done if done else nan,
            "episode_len": sum(self.lengths) / done if done else nan,
            "episodes": done,
            "env_steps": steps,
            "rollout_s": self.rollout_s,
            "env_steps_per_s": steps / max(self.rollout_s, 1e-9),
        }


def act_with_values(task: EpisodicTask, policy: ActorPolicy, observations: list[Any],
                    previous: np.ndarray) -> tuple[ModelInputs, torch.Tensor, torch.Tensor]:
    """`(inputs, log-probs [n, K], values [n])` of the policy and its value head on `n`
    observations (with each environment's previous action where the task reads it); CPU tensors."""
    x = task.encode(observations, previous if task.prev_action else None)
    device = policy.action_ids.device
    dist, value = policy(x.to(device), action_positions(x).to(device))
    return x, dist[:, 0].cpu(), value.cpu()


def run_steps(task: EpisodicTask, policy: ActorPolicy, steps: int, generator: torch.Generator) -> Steps:
    """Steps every environment `steps` times with the sampled policy and its value head.

    Every environment starts from a reset with a fresh training seed; one that ends is reset
    at once with the next seed of its own stream (seeded from `generator` at the rollout's
    start), so the rollout is reproducible and a run resumes exactly. Under torchrun each rank
    steps environments `task.env_rows` of `task.global_num_envs`, drawing the seeds and
    sampling noise of all of them from the shared `generator` and keeping its own: N ranks
    play exactly the rollout of one process. The model always sees all `M` environments
    (fixed shapes). A truncated
    episode gets the value of its final observation for its bootstrap (one more forward on
    `M` rows at a step where any episode is truncated); the last step is bootstrapped from
    the next observation.
    """
    start = time.perf_counter()
    envs, m = task.env.envs, task.num_envs
    rows, total = task.env_rows, task.global_num_envs
    streams = [torch.Generator().manual_seed(s) for s in draw_seeds(generator, total)[rows]]  # one per environment
    with quiet():
        obs = [env.reset(seed=draw_seeds(g, 1)[0])[0] for env, g in zip(envs, streams)]
    previous = np.full(m, -1, dtype=np.int64)
    ep_ret, ep_len = np.zeros(m), np.zeros(m, dtype=np.int64)
    parts, acts, logps, values = [], [], [], []
    rewards = np.zeros((steps, m))
    terminated, ended = np.zeros((steps, m), dtype=bool), np.zeros((steps, m), dtype=bool)
    final_values = torch.zeros(steps, m)
    returns, lengths = [], []

    def evaluate(observations: list[Any], prev: np.ndarray) -> tuple[ModelInputs, torch.Tensor, torch.Tensor]:
        return act_with_values(task, policy, observations, prev)  # [M, K], [M]

    for t in range(steps):
        x, logp, value = evaluate(obs, previous)
        choice = gumbel_sample(logp, generator, rows, total)  # [M]
        parts.append(x)
        acts.append(choice)
        logps.append(logp.gather(-1, choice[:, None])[:, 0])
        values.append(value)
        previous = choice.numpy().astype(np.int64)
        finals = list(obs)
        with quiet():
            for i, env in enumerate(envs):
                o, r, term, trunc, _ = env.step(int(choice[i]))
                ep_ret[i] += r
                ep_len[i] += 1
                rewards[t, i], terminated[t, i] = r, term
                ended[t, i] = term or trunc or ep_len[i] >= task.max_episode_steps
                obs[i] = finals[i] = o
        truncated = ended[t] & ~terminated[t]
        if truncated.any():  # V(final observation) of the cut episodes, on all M rows
            final_values[t] = torch.where(torch.from_numpy(truncated), evaluate(finals, previous)[2], 0.0)
        for i in np.flatnonzero(ended[t]):
            returns.append(float(ep_ret[i]))
            lengths.append(int(ep_len[i]))
            ep_ret[i], ep_len[i], previous[i] = 0.0, 0, -1
            with quiet():
                obs[i] = envs[i].reset(seed=draw_seeds(streams[i], 1)[0])[0]
    bootstrap = evaluate(obs, previous)[2]  # [M] the states after the last step
    values_t = torch.stack(values)  # [T, M]
    next_values = torch.cat([values_t[1:], bootstrap[None]])  # [T, M] the next step's value ...
    ended_t = torch.from_numpy(ended)
    next_values = torch.where(ended_t, final_values, next_values)  # ... unless the episode ended there
    return Steps(ModelInputs.cat(parts), torch.cat(acts), torch.cat(logps), values_t, next_values,
                 torch.from_numpy(rewards).float(), torch.from_numpy(terminated), ended_t, returns, lengths,
                 time.perf_counter() - start)
