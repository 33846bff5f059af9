"""The RL loop itself: rollout vs train time per GRPO iteration on a multi-step task.

    python -m lora_runtime.bench.rl_loop [CONFIG] [--iterations N] [--variants lora_eager,lora_compiled,peft_eager]

For each variant, the same warm-started built-in base (from CONFIG, default
configs/lora_new.yaml) gets the same rank-r adapter on the same targets (this runtime's
fused LoRA, eager or through `compile_actor`, or HF PEFT's `get_peft_model`; `lora_overlap`:
eager with the environments stepped in a child process, `task.overlap_envs`), with `lora_B`
drawn non-zero, and runs `N` iterations of the trainer's step (`rl.loop.rl_step`) from the same seed.
Iterations are interleaved across variants (variant order rotated by one per iteration) so a
load change on a shared machine hits all of them; the first iteration of each is a warm-up
(compilation) and is reported apart. Medians of `rollout_s`, `train_s` and env steps/s.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys

import torch
from torch import nn

from lora_runtime._threads import num_threads
from lora_runtime.actor import prepare_actor
from lora_runtime.adapters import adapter_disabled, iter_lora_layers
from lora_runtime.compile import compile_actor
from lora_runtime.config import load_config, validate_config
from lora_runtime.rl.builtin_base import load_base
from lora_runtime.rl.learners import learner_for
from lora_runtime.rl.loop import rl_step
from lora_runtime.rl.policy import ActorPolicy
from lora_runtime.rl.tasks import build_task

VARIANTS = ("lora_eager", "lora_compiled", "peft_eager")
EXTRA_VARIANTS = ("lora_overlap",)  # eager, with task.overlap_envs (asked for by name)


class _Reference:
    """The base policy: adapters disabled (ours), or PEFT's `disable_adapter()`."""

    def __init__(self, model: nn.Module, peft: bool) -> None:
        self.model, self.peft = model, peft

    @torch.no_grad()
    def apply(self, fn):
        ctx = self.model.disable_adapter() if self.peft else adapter_disabled(self.model)
        with ctx:
            return fn(self.model)


def _draw_b(layers: list[tuple[nn.Module, nn.Module]], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in layers:
            a.weight.copy_(torch.randn(a.weight.shape, generator=gen) / a.weight.shape[0])
            b.weight.copy_(torch.randn(b.weight.shape, generator=gen) * 0.02)


def build(variant: str, base: nn.Module, cfg) -> tuple[nn.Module, nn.Module, _Reference]:
    """`(model, forward_model, reference)` of one variant on a copy of `base`."""
    mc = cfg.actor.model
    if variant.startswith("peft"):
        from peft import LoraConfig, get_peft_model  # deferred: optional dependency

        ours = prepare_actor(copy.deepcopy(base), mc)
        targets = sorted({path.rsplit(".", 1)[-1] for path, _ in iter_lora_layers(ours)})
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=mc.lora_rank, lora_alpha=mc.lora_rank,
                                                                target_modules=targets, lora_dropout=0.0))
        inner = model.base_model.model
        layers = [(inner.get_submodule(p).lora_A["default"], inner.get_submodule(p).lora_B["default"])
                  for p, _ in iter_lora_layers(ours)]
        _draw_b(layers, 0)
        return model, model, _Reference(model, True)
    model = prepare_actor(copy.deepcopy(base), mc)
    _draw_b([(layer.lora_A, layer.lora_B) for _, layer in iter_lora_layers(model)], 0)
    # Compiled: fixed shapes (every forward sees all environments, prompts padded to the
    # model's width, update chunks padded to one size: `task.fixed_shapes`, `fixed_rows`), as
    # `runner.compile: true` trains, so it compiles once.
    forward = compile_actor(model, dynamic=False) if variant == "lora_compiled" else model
    return model, forward, _Reference(model, False)


def step(variant: str, run: dict, task, cfg) -> dict:
    """One trainer step (`rl.loop.rl_step`) of a variant built by `build` (its `model`,
    `forward`, `ref`, `opt`, `gen`); the compiled variant on fixed shapes."""
    fixed = variant == "lora_compiled"
    task.fixed_shapes = fixed
    try:
        policy = ActorPolicy(run["forward"], task.family, task.action_ids, cfg.algorithm.temperature, run.get("head"))
        return rl_step(run["model"], policy, learner_for(cfg.algorithm), task, run["ref"], run["opt"], cfg, run["gen"],
                       torch.device("cpu"), fixed_rows=fixed)
    finally:
        task.fixed_shapes = False


def measure(config: str, iterations: int, variants: list[str], threads: int = 1) -> dict:
    """Runs the interleaved loop; returns per-variant samples and medians."""
    cfg = load_config(config)
    with num_threads(threads):
        base = load_base(cfg)
        task = build_task(cfg, base)
        overlap_task = None
        if "lora_overlap" in variants:
            raw = cfg.model_dump()
            raw["task"]["overlap_envs"] = True
            overlap_task = build_task(validate_config(raw), base)
        runs = {}
        for v in variants:
            model, forward, ref = build(v, base, cfg)
            params = [p for p in model.parameters() if p.requires_grad]
            runs[v] = {"model": model, "forward": forward, "ref": ref,
                       "opt": torch.optim.AdamW(params, lr=cfg.algorithm.lr),
                       "gen": torch.Generator().manual_seed(cfg.runner.seed),
                       "samples": []}
        for i in range(iterations):
            order = variants[i % len(variants):] + variants[: i % len(variants)]
            for v in order:
                r = runs[v]
                stats = step(v, r, overlap_task if v == "lora_overlap" else task, cfg)
                r["samples"].append({k: stats[k] for k in ("rollout_s", "train_s", "env_steps", "env_steps_per_s",
                                                            "trained_rows", "success_rate")})
    load = os.getloadavg()
    out = {"config": config, "iterations": iterations, "threads": threads, "loadavg_end": load, "variants": {}}
    for v in variants:
        s = runs[v]["samples"]
        rest = s[1:] or s
        out["variants"][v] = {
            "warmup": s[0],
            "rollout_s": statistics.median(x["rollout_s"] for x in rest),
            "train_s": statistics.median(x["train_s"] for x in rest),
            "env_steps_per_s": statistics.median(x["env_steps_per_s"] for x in rest),
            "train_per_step_ms": statistics.median(1000 * x["train_s"] / max(x["trained_rows"], 1) for x in rest),
            "rollout_per_env_step_ms": statistics.median(1000 * x["rollout_s"] / x["env_steps"] for x in rest),
            "samples": s,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_runtime.bench.rl_loop", description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default="configs/lora_new.yaml")
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, of {', '.join(VARIANTS + EXTRA_VARIANTS)}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS + EXTRA_VARIANTS]
    if unknown or not variants:
        p.error(f"--variants={args.variants!r}: unknown {unknown or 'none given'}; "
                f"allowed: {', '.join(VARIANTS + EXTRA_VARIANTS)}")
    result = measure(args.config, args.iterations, variants, args.threads)
    print(f"RL loop, {args.config}, {args.iterations} iterations (first = warm-up), load at end {result['loadavg_end']}")
    print(f"{'variant':<15}{'rollout s':>10}{'train s':>9}{'env steps/s':>13}{'ms/env step':>13}{'train ms/step':>15}")
    for v, r in result["variants"].items():
        print(f"{v:<15}{r['rollout_s']:>10.2f}{r['train_s']:>9.2f}{r['env_steps_per_s']:>13.0f}"
              f"{r['rollout_per_env_step_ms']:>13.2f}{r['train_per_step_ms']:>15.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
