"""Which weights the rollouts run on, chosen by measurement: the live adapters (the fused
no-grad op in every patched layer) or `merged()` once per rollout phase (base-model speed
per forward, for the price of entering and leaving the merge).

`runner.rollout_weights: auto` decides after the first step: it counts the
policy's forwards in that step's rollout (`F`), times one forward of the task's example
batch unmerged (`t_u`) and inside `merged()` (`t_m`) and one enter + leave (`t_e`), and
keeps `merged` when `t_e + F * t_m < MARGIN * F * t_u`. The choice and its figures are
logged; every step's metrics carry `rollout_merged` (1 or 0). Under torchrun the timings are
averaged over the ranks first, so every rank makes the same choice.

Exactness: `merged()` restores every base weight bit for bit, so training is unaffected;
a merged rollout's log-probabilities differ from the update's unmerged ones by float
rounding (`rollout_logp_gap`). Full mode has no adapters and a compiled actor would be
traced again on the merged weights: both keep `unmerged`.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from lora_runtime import parallel
from lora_runtime.adapters import merged
from lora_runtime.config import ConfigError, RunConfig

__all__ = ["MARGIN", "RolloutWeights", "check_rollout_weights", "unmerged_only"]

MARGIN = 0.97  # merged must save at least 3 % of the rollout's forward time to be chosen
REPEATS = 5  # timings per figure (median)


def unmerged_only(run_cfg: RunConfig) -> str | None:
    """Why this run's rollouts can only use the unmerged weights, or None."""
    if run_cfg.actor.model.mode == "full":
        return "full mode: no adapters to merge"
    if run_cfg.runner.compile:
        return "a compiled actor would be traced again on the merged weights"
    return None


def check_rollout_weights(run_cfg: RunConfig) -> None:
    """Refuses `runner.rollout_weights: merged` where it cannot apply.

    Raises:
        ConfigError: the message names the key, the value and why.
    """
    reason = unmerged_only(run_cfg)
    if run_cfg.runner.rollout_weights == "merged" and reason:
        raise ConfigError(f"runner.rollout_weights='merged' cannot apply here ({reason}); use 'auto' or 'unmerged'")


class RolloutWeights:
    """The rollouts' weights of one run.

    Args:
        model: the trained actor (or its distributed wrapper).
        setting: `runner.rollout_weights`: "auto", "unmerged" or "merged".
        fixed_reason: why only "unmerged" applies (full mode, compiled actor), or None.
        log: where the choice is reported.
    """

    def __init__(self, model: nn.Module, setting: str, fixed_reason: str | None, log: Callable[[str], None]) -> None:
        self.model, self.log = model, log
        self.choice: str | None = "unmerged" if fixed_reason else (None if setting == "auto" else setting)
        if fixed_reason and setting == "auto":
            log(f"rollouts: unmerged weights ({fixed_reason})")

    @property
    def merged(self) -> bool:
        return self.choice == "merged"

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The block a rollout runs in: inside `merged(model)` when chosen."""
        if self.merged:
            with merged(self.model):
                yield
        else:
            yield

    def decide(self, forward: Callable[[], object], forwards_per_rollout: int) -> None:
        """Chooses once (auto): `forward()` runs the policy on a representative batch."""
        if self.choice is not None:
            return
        with torch.no_grad():
            t_u = _median_time(forward)
            t_e = _median_time(self._enter_and_leave)
            with merged(self.model):
                t_m = _median_time(forward)
        times = parallel.reduce_metrics({"t_u": t_u, "t_m": t_m, "t_e": t_e})  # the same choice on every rank
        t_u, t_m, t_e = times["t_u"], times["t_m"], times["t_e"]
        n = max(forwards_per_rollout, 1)
        self.choice = "merged" if t_e + n * t_m < MARGIN * n * t_u else "unmerged"
        self.log(f"rollouts: {self.choice} weights (measured: forward {1e3 * t_u:.2f} ms unmerged, {1e3 * t_m:.2f} ms "
                 f"merged; merged() enter + leave {1e3 * t_e:.2f} ms; {n} forwards per rollout: "
                 f"{1e3 * n * t_u:.1f} ms vs {1e3 * (t_e + n * t_m):.1f} ms)")

    def _enter_and_leave(self) -> None:
        with merged(self.model):
            pass


def _median_time(fn: Callable[[], object]) -> float:
    """Median seconds of `REPEATS` calls of `fn` after one warm-up call."""
    fn()  # warm-up
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
