"""The rollout loops of `episodes` with the environments in a child process
(`task.overlap_envs`, `env_worker.EnvWorker`): the environments are split into two halves,
and the policy acts for one half while the child steps the other.

Both loops act for the same rows in the same order as their in-process versions (half 0's
rows, then half 1's, at every step), so they draw the same sampling noise for them, record
the steps in the same order and reset the environments with the same seeds: a rollout
differs from the in-process one only where a forward of half the rows rounds differently
from a forward of all of them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lora_runtime.rl.models import ModelInputs
from lora_runtime.rl.policy import ActorPolicy, gumbel_sample
from lora_runtime.rl.tasks.env_worker import EnvWorker
from lora_runtime.rl.tasks.episodes import (
    Episodes,
    EpisodicTask,
    Steps,
    act_with_values,
    draw_seeds,
    run_episodes,
    run_steps,
)


def play_episodes(task: EpisodicTask, seeds: Sequence[int], policy: Any, record: bool = True) -> Episodes:
    """`episodes.run_episodes`, overlapped with the environment worker when the task has one
    (`task.overlap_envs`) and the policy neither reads the environment objects (the scripted
    expert) nor needs every row at every step (a compiled actor's fixed shapes)."""
    if not getattr(policy, "fixed_rows", False) and not getattr(policy, "reads_envs", False):
        worker = task.env_worker()
        if worker is not None:
            return run_episodes_overlapped(task, seeds, policy, record, worker)
    return run_episodes(task, seeds, policy, record)


def play_steps(task: EpisodicTask, policy: ActorPolicy, steps: int, generator: torch.Generator) -> Steps:
    """`episodes.run_steps`, overlapped with the environment worker when the task has one."""
    worker = task.env_worker()
    if worker is not None:
        return run_steps_overlapped(task, policy, steps, generator, worker)
    return run_steps(task, policy, steps, generator)


def run_episodes_overlapped(task: EpisodicTask, seeds: Sequence[int], policy: Any, record: bool,
                            worker: EnvWorker) -> Episodes:
    """`run_episodes` with the environments in `worker` (`env_worker.EnvWorker`): each round
    of `task.num_envs` seeds is split into two halves; the policy acts for one half while the
    worker steps the other. The policy acts for the same rows in the same order as the
    in-process loop (half 0's running rows, then half 1's, each step), so it draws the same
    noise for them, and steps are recorded in the same order."""
    start = time.perf_counter()
    width = task.num_envs
    parts: list[tuple[ModelInputs | None, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    returns = np.zeros(len(seeds))
    lengths = np.zeros(len(seeds), dtype=np.int64)
    for first in range(0, len(seeds), width):
        chunk = list(seeds[first:first + width])
        observations = worker.reset(list(enumerate(chunk)))
        previous = np.full(len(chunk), -1, dtype=np.int64)  # [n] each environment's last action
        half = (len(chunk) + 1) // 2
        active = [list(range(half)), list(range(half, len(chunk)))]  # running environments of each half
        in_flight: list[int] | None = None  # the rows the worker is stepping
        h = 0
        while active[0] or active[1]:
            rows = list(active[h])
            if rows:  # the policy acts for half h while the worker steps the other half
                obs = task.encode([observations[i] for i in rows], previous[rows] if task.prev_action else None) \
                    if record or policy.needs_obs else None
                choice, logp = policy.act(obs, rows)
                previous[rows] = choice.numpy()
                if record:
                    parts.append((obs, torch.tensor(rows) + first, choice, logp))
            if in_flight is not None:
                for i, (o, reward, terminated, truncated, _) in zip(in_flight, worker.step_wait(), strict=True):
                    observations[i] = o
                    returns[first + i] += reward
                    lengths[first + i] += 1
                    if terminated or truncated or lengths[first + i] >= task.max_episode_steps:
                        active[int(i >= half)].remove(i)
                in_flight = None
            if rows:
                worker.step_async(list(zip(rows, choice.tolist(), strict=True)))
                in_flight = rows
            h = 1 - h
    empty = torch.zeros(0, dtype=torch.long)
    return Episodes(
        obs=ModelInputs.cat([p[0] for p in parts]) if record else None,
        episode=torch.cat([p[1] for p in parts]) if record else empty,
        actions=torch.cat([p[2] for p in parts]) if record else empty,
        logp=torch.cat([p[3] for p in parts]) if record else torch.zeros(0),
        returns=torch.from_numpy(returns).float(),
        lengths=torch.from_numpy(lengths),
        seeds=list(seeds),
        rollout_s=time.perf_counter() - start,
    )


def run_steps_overlapped(task: EpisodicTask, policy: ActorPolicy, steps: int, generator: torch.Generator,
                         worker: EnvWorker) -> Steps:
    """`episodes.run_steps` (PPO's `steps` steps of every environment, one process) with the
    environments in `worker`. Each environment's next reset seed is drawn from its own stream
    one reset ahead (the same seeds, in the same order), so the child resets an environment
    as soon as its episode ends; a truncated episode's final observation comes back for its
    bootstrap value (a forward on its half)."""
    start = time.perf_counter()
    m = task.num_envs
    streams = [torch.Generator().manual_seed(s) for s in draw_seeds(generator, m)]  # one per environment
    observations = worker.reset([(i, draw_seeds(g, 1)[0]) for i, g in enumerate(streams)])
    next_seed = [draw_seeds(g, 1)[0] for g in streams]  # each environment's next reset seed
    half = (m + 1) // 2
    halves = [list(range(half)), list(range(half, m))]
    previous = np.full(m, -1, dtype=np.int64)
    ep_ret, ep_len = np.zeros(m), np.zeros(m, dtype=np.int64)
    parts: list[list[ModelInputs | None]] = [[None, None] for _ in range(steps)]  # [t][half]
    actions = torch.zeros(steps, m, dtype=torch.long)
    logps, values, final_values = torch.zeros(steps, m), torch.zeros(steps, m), torch.zeros(steps, m)
    rewards = np.zeros((steps, m))
    terminated, ended = np.zeros((steps, m), dtype=bool), np.zeros((steps, m), dtype=bool)
    returns: list[float] = []
    lengths: list[int] = []

    def evaluate(observations_: list[Any], prev: np.ndarray) -> tuple[ModelInputs, torch.Tensor, torch.Tensor]:
        return act_with_values(task, policy, observations_, prev)  # [n, K], [n]

    def collect(h: int, t: int, results: list[Any]) -> None:
        """Half `h`'s step `t` as the child returns it (plain `run_steps`'s bookkeeping)."""
        rows = halves[h]
        finals = []
        for i, (o, reward, term, trunc, _) in zip(rows, results, strict=True):
            ep_ret[i] += reward
            ep_len[i] += 1
            rewards[t, i], terminated[t, i] = reward, term
            ended[t, i] = term or trunc or ep_len[i] >= task.max_episode_steps
            finals.append(o)
            observations[i] = o
        cut = torch.from_numpy(ended[t, rows] & ~terminated[t, rows])
        if cut.any():  # V(final observation) of the cut episodes
            final_values[t, rows] = torch.where(cut, evaluate(finals, previous[rows])[2], 0.0)
        for i, (_, _, _, _, reset_obs) in zip(rows, results, strict=True):
            if ended[t, i]:
                returns.append(float(ep_ret[i]))
                lengths.append(int(ep_len[i]))
                ep_ret[i], ep_len[i], previous[i] = 0.0, 0, -1
                observations[i] = reset_obs
                next_seed[i] = draw_seeds(streams[i], 1)[0]

    next_t = [0, 0]
    in_flight: tuple[int, int] | None = None  # (half, step) the child is stepping
    h = 0
    while next_t[0] < steps or next_t[1] < steps or in_flight is not None:
        rows, t = halves[h], next_t[h]
        acting = t < steps and bool(rows)
        if acting:  # the policy acts for half h while the child steps the other half
            x, logp, value = evaluate([observations[i] for i in rows], previous[rows])
            choice = gumbel_sample(logp, generator)  # [n]
            parts[t][h] = x
            actions[t, rows], logps[t, rows], values[t, rows] = choice, logp.gather(-1, choice[:, None])[:, 0], value
            previous[rows] = choice.numpy()
        done = None if in_flight is None else (*in_flight, worker.step_wait())
        in_flight = None
        if acting:
            worker.step_async([(i, int(a), bool(ep_len[i] + 1 >= task.max_episode_steps), next_seed[i])
                               for i, a in zip(rows, choice.tolist(), strict=True)])
            in_flight, next_t[h] = (h, t), t + 1
        elif not rows:
            next_t[h] = steps  # an empty half (one environment in all) takes no steps
        if done is not None:
            collect(*done)
        h = 1 - h
    bootstrap = evaluate(observations, previous)[2]  # [M] the states after the last step (all rows, as in-process)
    next_values = torch.cat([values[1:], bootstrap[None]])  # [T, M] the next step's value ...
    ended_t = torch.from_numpy(ended)
    next_values = torch.where(ended_t, final_values, next_values)  # ... unless the episode ended there
    obs = ModelInputs.cat([p for row in parts for p in row if p is not None])
    return Steps(obs, actions.reshape(-1), logps.reshape(-1), values, next_values, torch.from_numpy(rewards).float(),
                 torch.from_numpy(terminated), ended_t, returns, lengths, time.perf_counter() - start)
