"""Time to success: training wall time until greedy held-out success first reaches each threshold.

    lora-runtime bench time-to-success [--levels BabyAI-GoToObj-v0,BabyAI-GoToLocal-v0]
        [--variants lora_eager,lora_compiled,peft_eager] [--budget-s 300] [--eval-every 5]
        [--eval-episodes 100] [--config configs/lora_new.yaml] [--set KEY=VALUE ...]

Per level, one warm-started built-in base (built and cached as `train` does; the level goes
into `task.env_id`), then one run per variant from the same start: this runtime's LoRA
eager, this runtime's LoRA through `compile_actor` on fixed shapes (as `runner.compile:
true` trains), and HF PEFT's LoRA (`get_peft_model`, the same targets, rank and alpha, its
A and B set to ours), each with the same trainer seed, optimizer and algorithm (the config's,
GRPO or PPO; PPO's value head drawn alike for each). Iterations are interleaved round-robin
over the variants and each variant's clock counts only its own iterations, so a change of
machine load hits all of them. Every `--eval-every` iterations the variant's greedy success on
the first `--eval-episodes` held-out seeds is measured (eager, the same seeds for every
variant; not counted in its clock). A variant stops at the last threshold or once its clock
passes `--budget-s`. Reported per variant: the clock (and iteration) at which each threshold
was first reached (None: not within the budget), compile time (the first iteration's excess
over the median), the medians of rollout and update seconds per iteration and of env steps
per second. JSON: `bench/results/time_to_success-<level>.json` (or `--out-dir`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

from lora_runtime._threads import num_threads
from lora_runtime.actor import prepare_actor
from lora_runtime.adapters import iter_lora_layers
from lora_runtime.bench.rl_loop import _Reference, step
from lora_runtime.compile import compile_actor
from lora_runtime.config import load_config
from lora_runtime.rl.builtin_base import load_base
from lora_runtime.rl.learners import make_value_head
from lora_runtime.rl.tasks import build_task

VARIANTS = ("lora_eager", "lora_compiled", "peft_eager")
LEVELS = ("BabyAI-GoToObj-v0", "BabyAI-GoToLocal-v0")
THRESHOLDS = (0.6, 0.8, 0.9)


def _variant(name: str, base: nn.Module, cfg, hidden: int | None) -> dict[str, Any]:
    """One variant's model, compiled forward, reference, value head, optimizer and generator."""
    mc = cfg.actor.model
    ours = prepare_actor(copy.deepcopy(base), mc, generator=torch.Generator().manual_seed(cfg.runner.seed))
    model, forward, ref = ours, ours, _Reference(ours, False)
    if name.startswith("peft"):
        from peft import LoraConfig, get_peft_model  # deferred: optional dependency

        targets = sorted({path.rsplit(".", 1)[-1] for path, _ in iter_lora_layers(ours)})
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=mc.lora_rank, lora_alpha=mc.lora_alpha or mc.lora_rank,
                                                                target_modules=targets, lora_dropout=0.0))
        inner = model.base_model.model
        with torch.no_grad():
            for path, layer in iter_lora_layers(ours):
                inner.get_submodule(path).lora_A["default"].weight.copy_(layer.lora_A.weight)
                inner.get_submodule(path).lora_B["default"].weight.copy_(layer.lora_B.weight)
        forward, ref = model, _Reference(model, True)
    elif name == "lora_compiled":
        forward = compile_actor(ours, dynamic=False)
    head = None
    if hidden is not None:  # PPO: the same head init for every variant
        head = make_value_head(hidden, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(cfg.runner.seed))
    params = [p for p in model.parameters() if p.requires_grad] + ([] if head is None else list(head.parameters()))
    opt = torch.optim.AdamW(params, lr=cfg.algorithm.lr, weight_decay=cfg.algorithm.weight_decay, foreach=True)
    return {"model": model, "forward": forward, "ref": ref, "head": head, "opt": opt,
            "gen": torch.Generator().manual_seed(cfg.runner.seed), "clock": 0.0, "iterations": [], "evals": [],
            "reached": {str(t): None for t in THRESHOLDS}, "done": False}


def _params_module(run: dict[str, Any]) -> nn.Module:
    """What `rl_step` clips and steps: the model, with the value head when there is one."""
    if run["head"] is None:
        return run["model"]
    holder = nn.Module()
    holder.model, holder.value_head = run["model"], run["head"]
    return holder


def measure_level(level: str, config: str, overrides: list[str], variants: list[str], budget_s: float,
                  eval_every: int, eval_episodes: int, threads: int, log=print) -> dict[str, Any]:
    """Runs every variant on one level until its last threshold or its budget; returns the report."""
    cfg = load_config(config, [*overrides, f"task.env_id={level}"])
    with num_threads(threads):
        base = load_base(cfg, log=log)
        task = build_task(cfg, base)
        hidden = task.family.hidden_size(base) if cfg.algorithm.name == "ppo" else None
        start = task.evaluate(base, eval_episodes)["success_rate"]
        log(f"{level}: warm start greedy success {start:.3f} on {eval_episodes} held-out episodes")
        runs = {v: _variant(v, base, cfg, hidden) for v in variants}
        i = 0
        while not all(r["done"] for r in runs.values()):
            order = variants[i % len(variants):] + variants[: i % len(variants)]
            for v in order:
                r = runs[v]
                if r["done"]:
                    continue
                run = {**r, "model": _params_module(r)} if r["head"] is not None else r
                t0 = time.perf_counter()
                stats = step(v, run, task, cfg)
                elapsed = time.perf_counter() - t0
                r["clock"] += elapsed
                r["iterations"].append({"s": elapsed, "rollout_s": stats["rollout_s"], "train_s": stats["train_s"],
                                        "env_steps": stats["env_steps"], "env_steps_per_s": stats["env_steps_per_s"],
                                        "sampled_success": stats.get("success_rate")})
                n = len(r["iterations"])
                if n % eval_every == 0:
                    result = task.evaluate(r["model"], eval_episodes)["success_rate"]
                    r["evals"].append({"iteration": n, "clock_s": round(r["clock"], 2), "success": result})
                    for t in THRESHOLDS:
                        if result >= t and r["reached"][str(t)] is None:
                            r["reached"][str(t)] = {"clock_s": round(r["clock"], 2), "iteration": n}
                    log(f"  {v:<14} iteration {n:4d}, clock {r['clock']:7.1f} s: greedy success {result:.3f}")
                    r["done"] = result >= THRESHOLDS[-1]
                if r["clock"] >= budget_s:
                    r["done"] = True
            i += 1
    report = {"level": level, "config": config, "overrides": overrides, "algorithm": cfg.algorithm.name,
              "budget_s": budget_s, "eval_every": eval_every, "eval_episodes": eval_episodes, "threads": threads,
              "warm_start_success": start, "variants": {}}
    for v, r in runs.items():
        its = r["iterations"]
        rest = its[1:] or its
        med = statistics.median(x["s"] for x in rest)
        report["variants"][v] = {
            "reached": r["reached"], "clock_s": round(r["clock"], 2), "iterations": len(its),
            "best_success": max((e["success"] for e in r["evals"]), default=None),
            "first_iteration_s": its[0]["s"], "compile_s": (max(its[0]["s"] - med, 0.0) if len(its) > 1 else None) if v == "lora_compiled" else 0.0,
            "iteration_s": med,
            "rollout_s": statistics.median(x["rollout_s"] for x in rest),
            "train_s": statistics.median(x["train_s"] for x in rest),
            "env_steps_per_s": statistics.median(x["env_steps"] / x["s"] for x in rest),
            "evals": r["evals"], "samples": its,
        }
    return report


def _load() -> str:
    """The 1/5/15-minute load averages."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lora-runtime bench time-to-success", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/lora_new.yaml")
    p.add_argument("--levels", default=",".join(LEVELS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--budget-s", type=float, default=300.0, help="training seconds per variant at most (300)")
    p.add_argument("--eval-every", type=int, default=5, help="iterations between greedy evaluations (5)")
    p.add_argument("--eval-episodes", type=int, default=100, help="held-out episodes per evaluation (100)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or args.budget_s <= 0 or args.eval_every < 1 or args.eval_episodes < 1:
        p.error(f"--variants {bad} not in {list(VARIANTS)}" if bad else
                "--budget-s, --eval-every and --eval-episodes must be positive")
    os.makedirs(args.out_dir, exist_ok=True)
    for level in [x for x in args.levels.split(",") if x]:
        load_start = _load()
        report = measure_level(level, args.config, args.set, variants, args.budget_s, args.eval_every,
                               args.eval_episodes, args.threads)
        report["load_start"] = load_start
        report["load_end"] = _load()
        path = os.path.join(args.out_dir, f"time_to_success-{level}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        print(f"\n{level} ({report['algorithm']}), warm start {report['warm_start_success']:.3f}, load "
              f"{report['load_start']} -> {report['load_end']}")
        print(f"{'variant':<15}" + "".join(f"{'to ' + str(t):>12}" for t in THRESHOLDS)
              + f"{'best':>7}{'iter s':>8}{'rollout':>9}{'update':>8}{'env st/s':>10}{'compile s':>10}")
        for v, r in report["variants"].items():
            cells = "".join(f"{'-' if r['reached'][str(t)] is None else str(round(r['reached'][str(t)]['clock_s'])) + ' s':>12}"
                            for t in THRESHOLDS)
            compile_s = "?" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
            print(f"{v:<15}{cells}{r['best_success'] or 0:>7.3f}{r['iteration_s']:>8.2f}{r['rollout_s']:>9.2f}"
                  f"{r['train_s']:>8.2f}{r['env_steps_per_s']:>10.0f}{compile_s:>10}")
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
