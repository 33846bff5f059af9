"""Soak: one process runs many RL iterations; resident memory, step time, open files and child
processes are sampled after every iteration.

    .venv/bin/python bench/soak.py                                  # 200 iterations of configs/lora_new.yaml
    .venv/bin/python bench/soak.py configs/lora_new.yaml --steps 200 --set task.num_envs=16

The run is an ordinary `lora-runtime train` of the config (output in a temporary folder, one
thread unless `--set runner.num_threads=N`), with the metrics callback sampling
`/proc/self/status` (VmRSS), `/proc/self/fd` and `/proc/self/task/*/children`. Reported:
growth of RSS and of the median step time from iteration `--from` (default 20) to the last
(medians of 10-iteration windows), the open file descriptors and child processes at both
ends. Written to `bench/results/soak-<name>.json` with the machine's load at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def children() -> int:
    n = 0
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            n += len(f.read().split())
    return n


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def window(values: list[float], at: int, width: int = 10) -> float:
    """Median of `values[at - width // 2 : at + width // 2]`, clipped to the list."""
    lo = max(0, min(at - width // 2, len(values) - width))
    return statistics.median(values[lo:lo + width])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default="configs/lora_new.yaml")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--from", dest="start", type=int, default=20, help="the iteration growth is measured from")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--name", default=None, help="results file name (default: the config's stem)")
    args = p.parse_args(argv)

    from lora_runtime.config import load_config
    from lora_runtime.rl.trainer import train

    out = tempfile.mkdtemp(prefix="soak-")
    run_cfg = load_config(args.config, [*args.set, f"runner.steps={args.steps}", f"runner.output_dir={out}/run",
                                        "runner.plot=false", "runner.progress=false"])
    samples: list[dict] = []
    last = [time.perf_counter()]

    def on_step(record: dict) -> None:
        now = time.perf_counter()
        samples.append({"step": record["step"], "wall_s": now - last[0], "step_time_s": record["step_time_s"],
                        "rss_mib": rss_mib(), "fds": len(os.listdir("/proc/self/fd")), "children": children(),
                        "env_steps": record.get("env_steps"), "success_rate": record.get("success_rate"),
                        "reward_mean": record.get("reward_mean")})
        last[0] = now
        if record["step"] % 10 == 0:
            s = samples[-1]
            print(f"step {s['step']:4d}: rss {s['rss_mib']:.0f} MiB, step {s['step_time_s']:.2f} s, "
                  f"fds {s['fds']}, children {s['children']}", flush=True)

    load_start = loadavg()
    train(run_cfg, on_step=on_step, log=lambda m: print(m, flush=True))
    load_end = loadavg()
    n, i0 = len(samples), min(args.start, len(samples) - 1)
    rss, times = [s["rss_mib"] for s in samples], [s["step_time_s"] for s in samples]
    # An iteration's work follows its episodes (a policy that succeeds sooner steps less):
    # time per environment step is the figure that should stay flat.
    per_env_step = [s["step_time_s"] / s["env_steps"] * 1e3 for s in samples if s["env_steps"]]
    report = {
        "config": args.config, "overrides": args.set, "steps": n, "from": args.start,
        "load_start": load_start, "load_end": load_end,
        "rss_mib_from": window(rss, i0), "rss_mib_end": window(rss, n - 1),
        "step_s_from": window(times, i0), "step_s_end": window(times, n - 1),
        "fds_from": samples[i0]["fds"], "fds_end": samples[-1]["fds"],
        "children_from": samples[i0]["children"], "children_end": samples[-1]["children"],
        "rss_mib_max": max(rss), "samples": samples,
    }
    if len(per_env_step) == n:
        report["ms_per_env_step_from"] = window(per_env_step, i0)
        report["ms_per_env_step_end"] = window(per_env_step, n - 1)
        report["ms_per_env_step_growth"] = report["ms_per_env_step_end"] / report["ms_per_env_step_from"] - 1
    report["rss_growth"] = report["rss_mib_end"] / report["rss_mib_from"] - 1
    report["step_time_growth"] = report["step_s_end"] / report["step_s_from"] - 1
    name = args.name or os.path.splitext(os.path.basename(args.config))[0]
    os.makedirs("bench/results", exist_ok=True)
    path = f"bench/results/soak-{name}.json"
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"soak {name}: {n} iterations, load {load_start} -> {load_end}\n"
          f"  RSS {report['rss_mib_from']:.0f} MiB at iteration {args.start} -> {report['rss_mib_end']:.0f} MiB at "
          f"{n} ({report['rss_growth']:+.1%}); max {report['rss_mib_max']:.0f} MiB\n"
          f"  step time {report['step_s_from']:.3f} s -> {report['step_s_end']:.3f} s ({report['step_time_growth']:+.1%})"
          + (f"; per env step {report['ms_per_env_step_from']:.2f} ms -> {report['ms_per_env_step_end']:.2f} ms "
             f"({report['ms_per_env_step_growth']:+.1%})" if "ms_per_env_step_growth" in report else "") + "\n"
          f"  open fds {report['fds_from']} -> {report['fds_end']}; child processes {report['children_from']} -> "
          f"{report['children_end']}\n  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
