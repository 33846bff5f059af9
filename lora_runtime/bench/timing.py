"""Side-by-side timing for the benchmark harness: interleaved variants, warm-up excluded,
median of repeats, and a description of the machine the figures come from.

One `measure_interleaved` call times a group of variants that are compared with each
other. Each variant is calibrated first (its warm-up calls are timed but not kept): a
variant whose single call is shorter than `min_sample_s` is run `number` times per sample
so that the timer's resolution and the per-sample overhead do not matter. Then, for each
repeat, every variant is timed once, in an order rotated by one each repeat, so that a
burst of load from another process falls on all variants alike.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "CLOCKS",
    "Timing",
    "Variant",
    "machine_info",
    "measure_interleaved",
    "synced",
    "synchronizer",
]


@dataclass(frozen=True)
class Variant:
    """One thing to time: `fn()` runs one call (a forward, a train step, ...)."""

    name: str
    fn: Callable[[], object]


@dataclass
class Timing:
    """Raw figures of one variant: seconds per call, one entry per repeat."""

    name: str
    number: int  # calls per sample
    warmup_s: list[float] = field(default_factory=list)  # single calls, excluded
    samples_s: list[float] = field(default_factory=list)  # per call, one per repeat

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def min_s(self) -> float:
        return min(self.samples_s)

    def to_json(self) -> dict:
        return {
            "number": self.number,
            "repeats": len(self.samples_s),
            "median_s": self.median_s,
            "min_s": self.min_s,
            "warmup_s": self.warmup_s,
            "samples_s": self.samples_s,
        }


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,  # what a user waits for; the default
    # CPU time of this process: on a machine shared with other jobs it leaves out the time
    # spent waiting for a core (use it with --threads 1: OpenMP threads spin while waiting).
    "cpu": time.process_time,
}


def synced(fn: Callable[[], object], device: torch.device | str) -> Callable[[], object]:
    """`fn` followed by a device synchronisation (CUDA timings then cover the work)."""
    device = torch.device(device)
    if device.type != "cuda":
        return fn

    def call() -> object:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


def _time_calls(fn: Callable[[], object], number: int, sync: Callable[[], None],
                clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per call of `number` back-to-back calls, the garbage collector off."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        sync()
        start = clock()
        for _ in range(number):
            fn()
        sync()
        return (clock() - start) / number
    finally:
        if gc_was_enabled:
            gc.enable()


def measure_interleaved(
    variants: Sequence[Variant],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    min_repeats: int = 3,
    max_repeats: int = 15,
    budget_s: float = 1.0,
    min_sample_s: float = 0.002,
    repeats: int | None = None,
    clock: str = "wall",
) -> dict[str, Timing]:
    """Times `variants` side by side and returns their raw figures by name.

    Args:
        variants: the variants compared with each other (distinct names).
        device: where the variants run; CUDA work is synchronised around each sample.
        warmup: calls per variant before timing (at least 1; they also calibrate).
        min_repeats: fewest timed samples per variant.
        max_repeats: most timed samples per variant.
        budget_s: time the timed part of the group should take; it picks the repeat
            count between `min_repeats` and `max_repeats`.
        min_sample_s: a variant faster than this is called several times per sample.
        repeats: a fixed repeat count (overrides the budget).
        clock: "wall" (elapsed time) or "cpu" (this process's CPU time), see `CLOCKS`.

    Returns:
        `{name: Timing}` in the order of `variants`.

    Raises:
        ValueError: empty or duplicate names, a count below 1, an unknown clock.
    """
    if clock not in CLOCKS:
        raise ValueError(f"measure_interleaved: clock={clock!r}; allowed {sorted(CLOCKS)}")
    tick = CLOCKS[clock]
    names = [v.name for v in variants]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"measure_interleaved: variant names must be distinct, got {names}")
    if warmup < 1 or min_repeats < 1 or max_repeats < min_repeats:
        raise ValueError(
            f"measure_interleaved: need warmup >= 1 and 1 <= min_repeats <= max_repeats, "
            f"got warmup={warmup}, min_repeats={min_repeats}, max_repeats={max_repeats}"
        )
    sync = synchronizer(device)
    timings = {v.name: Timing(v.name, number=1) for v in variants}
    for _ in range(warmup):  # interleaved too: every variant sees the same warm caches
        for v in variants:
            timings[v.name].warmup_s.append(_time_calls(v.fn, 1, sync, tick))
    per_repeat = 0.0
    for v in variants:
        single = max(min(timings[v.name].warmup_s[-1:] or [1e-6]), 1e-7)
        timings[v.name].number = max(1, math.ceil(min_sample_s / single))
        per_repeat += single * timings[v.name].number
    if repeats is None:
        repeats = int(budget_s / per_repeat) if per_repeat > 0 else max_repeats
    repeats = max(min_repeats, min(max_repeats, repeats))
    for rep in range(repeats):
        k = rep % len(variants)
        for v in [*variants[k:], *variants[:k]]:  # rotate: no variant always goes first
            t = timings[v.name]
            t.samples_s.append(_time_calls(v.fn, t.number, sync, tick))
    return timings


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device | str = "cpu") -> dict:
    """What the figures were measured on: CPU, load, threads, library versions, GPU."""
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    device = torch.device(device)
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "mkldnn_bf16": bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)()),
        "device": str(device),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        from lora_runtime.ops import extension_loaded  # deferred: start-up time

        info["extension_loaded"] = extension_loaded()
    except ImportError:
        info["extension_loaded"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": props.name,
            "total_memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
        }
    return info
