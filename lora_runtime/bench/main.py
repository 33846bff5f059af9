"""`lora-runtime bench`: side-by-side timings of this runtime, HF PEFT and the frozen base.

Prints one report (op-level ratio table, model-level table, peak memory, the targets) and
writes a JSON with every raw figure and the machine description. Every ratio comes from
variants timed in one process, interleaved, warm-up excluded, median of the repeats.
See BENCHMARKS.md for what each figure means.

    lora-runtime bench                  # the full op grid, tiny Llama and the built-in actor
    lora-runtime bench --quick          # a few op shapes, tiny Llama only
    lora-runtime bench --device cuda    # the same on a GPU
    python -m lora_runtime.bench --memory-variant lora_eager --model tiny-llama   # one child
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lora_runtime._fs import write_text_atomic

__all__ = ["main", "run"]

PRESETS = {
    "full": {"tokens": "1,16,512,4096", "shapes": "1024x1024,2048x5504,4096x4096",
             "ranks": "8,32,64", "dtypes": "float32,bfloat16", "models": "tiny-llama,actor",
             "op_budget": 0.5, "model_budget": 8.0, "min_repeats": 5, "op_min_repeats": 3},
    "quick": {"tokens": "16,512", "shapes": "1024x1024,2048x5504", "ranks": "32",
              "dtypes": "float32,bfloat16", "models": "tiny-llama",
              "op_budget": 0.6, "model_budget": 6.0, "min_repeats": 5, "op_min_repeats": 5},
    "smoke": {"tokens": "16", "shapes": "64x64", "ranks": "8", "dtypes": "float32",
              "models": "tiny-llama-smoke",
              "op_budget": 0.05, "model_budget": 0.3, "min_repeats": 3, "op_min_repeats": 3},
}
SMOKE_TRAIN = "base,lora_eager,peft_eager,full"
SMOKE_MEMORY = "lora_eager"


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(t) for t in _csv(text)]
    except ValueError:
        raise SystemExit(f"bench: {flag}={text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise SystemExit(f"bench: {flag}={text!r}: expected integers >= 1")
    return values


def _shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in _csv(text):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"bench: --shapes item {item!r}: expected INxOUT, e.g. 1024x1024")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-runtime bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="full",
                   help="grid and models (default full: what `make bench` runs)")
    p.add_argument("--quick", action="store_const", const="quick", dest="preset",
                   help="same as --preset quick")
    p.add_argument("--smoke", action="store_const", const="smoke", dest="preset",
                   help="one toy case of everything (the smoke test)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall (default) or cpu: this process's CPU time, for a shared machine "
                   "(with --threads 1)")
    p.add_argument("--tokens", help="op grid: token counts N, e.g. 1,16,512,4096")
    p.add_argument("--shapes", help="op grid: INxOUT list, e.g. 1024x1024,4096x4096")
    p.add_argument("--ranks", help="op grid: ranks, e.g. 8,32,64")
    p.add_argument("--dtypes", help="op grid: dtypes, e.g. float32,bfloat16")
    p.add_argument("--models", help="model level: comma-separated names (tiny-llama, actor, ...)")
    p.add_argument("--train-variants", help="model level: train-step variants to time")
    p.add_argument("--rollout-variants", help="model level: rollout variants to time")
    p.add_argument("--memory-variants", help="model level: train-step variants to measure memory of")
    p.add_argument("--skip-op", action="store_true", help="no op-level benchmark")
    p.add_argument("--skip-model", action="store_true", help="no model-level timing")
    p.add_argument("--skip-memory", action="store_true", help="no peak-memory children")
    p.add_argument("--skip-decode", action="store_true",
                   help="no generate-with-KV-cache decode timing and no per-call layer timing")
    p.add_argument("--op-budget", type=float, help="seconds per op group (preset: 0.6)")
    p.add_argument("--model-budget", type=float, help="seconds per model-level group (preset: 8)")
    p.add_argument("--min-repeats", type=int,
                   help="fewest samples per variant (preset: 5 for models, 3 for op groups)")
    p.add_argument("--max-repeats", type=int, default=25, help="most samples per variant (25)")
    p.add_argument("--memory-parallel", type=int,
                   help="memory children run at a time (default: CPU count; 1 on CUDA)")
    p.add_argument("--memory-threads", type=int, default=1,
                   help="torch threads of each memory child (default 1)")
    p.add_argument("--profile", action="store_true",
                   help="also profile the eager train steps (torch.profiler, self CPU time by "
                   "category: base GEMMs, rank-r GEMMs, attention, optimizer, op glue, other)")
    p.add_argument("--json", dest="json_path", help="output JSON (default runs/bench/bench-<UTC>.json)")
    p.add_argument("--memory-variant", help=argparse.SUPPRESS)  # child mode: one variant
    p.add_argument("--model", help=argparse.SUPPRESS)
    return p


def _device(name: str):
    from lora_runtime.parallel import resolve_device  # deferred: start-up time (loads torch)

    try:
        return resolve_device(name, "bench: --device")
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def _plan(args: argparse.Namespace) -> dict:
    """Validates every argument before anything runs; returns what to run.

    Raises:
        SystemExit: a bad value (the message names the flag, the value, what is allowed).
    """
    from lora_runtime.bench.model import ROLLOUT_VARIANTS, TRAIN_VARIANTS  # deferred: start-up time
    from lora_runtime.bench.op import _dtype, op_groups  # deferred: start-up time
    from lora_runtime.bench.specs import MODEL_SPECS  # deferred: start-up time

    preset = PRESETS[args.preset]
    args.op_min_repeats = args.min_repeats or preset["op_min_repeats"]
    for key in ("op_budget", "model_budget", "min_repeats"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if min(args.min_repeats, args.op_min_repeats) < 1 or args.max_repeats < max(
            args.min_repeats, args.op_min_repeats):
        raise SystemExit(f"bench: need 1 <= --min-repeats <= --max-repeats, got "
                         f"{args.min_repeats} and {args.max_repeats}")
    for flag, value in (("--memory-parallel", args.memory_parallel),
                        ("--memory-threads", args.memory_threads), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise SystemExit(f"bench: {flag} {value}: expected >= 1")
    smoke = args.preset == "smoke"
    plan = {"device": _device(args.device), "groups": [], "models": _csv(args.models or preset["models"]),
            "train": _csv(args.train_variants or (SMOKE_TRAIN if smoke else ",".join(TRAIN_VARIANTS))),
            "rollout": _csv(args.rollout_variants or ",".join(ROLLOUT_VARIANTS))}
    plan["memory"] = _csv(args.memory_variants or (SMOKE_MEMORY if smoke else ",".join(plan["train"])))
    for flag, names, allowed in (("--models", plan["models"], MODEL_SPECS),
                                 ("--train-variants", plan["train"], TRAIN_VARIANTS),
                                 ("--rollout-variants", plan["rollout"], ROLLOUT_VARIANTS),
                                 ("--memory-variants", plan["memory"], TRAIN_VARIANTS)):
        for name in names:
            if name not in allowed:
                raise SystemExit(f"bench: {flag}: unknown name {name!r}; allowed {list(allowed)}")
    if not args.skip_op:
        dtypes = _csv(args.dtypes or preset["dtypes"])
        for dt in dtypes:
            try:
                _dtype(dt)
            except ValueError as exc:
                raise SystemExit(f"bench: --dtypes: {exc}") from None
        plan["groups"] = op_groups(_ints(args.tokens or preset["tokens"], "--tokens"),
                                   _shapes(args.shapes or preset["shapes"]),
                                   _ints(args.ranks or preset["ranks"], "--ranks"), dtypes)
    return plan


def _model_section(name: str, plan: dict, args, log) -> dict:
    from lora_runtime.bench.model import (  # deferred: start-up time
        ModelBench,
        model_flop_limits,
        time_rollout,
        time_train,
    )
    from lora_runtime.bench.specs import get_spec  # deferred: start-up time

    device = plan["device"]
    spec = get_spec(name)
    result: dict = {"model": name, "description": spec.description, "sizes": spec.sizes}
    start = time.perf_counter()
    bench = ModelBench(spec, device)
    result["targets_patched"] = bench.targets
    reps = {"min_repeats": args.min_repeats, "max_repeats": args.max_repeats, "clock": args.clock}
    if not args.skip_model:
        timings, extra = time_train(bench, plan["train"], budget_s=args.model_budget, **reps)
        result["train"] = {k: t.to_json() for k, t in timings.items()}
        result.update(extra)
        log(f"  model {name}: train steps timed ({time.perf_counter() - start:.0f} s)")
        rollout = time_rollout(bench, plan["rollout"], budget_s=args.model_budget / 2, **reps)
        result["rollout"] = {k: t.to_json() for k, t in rollout.items()}
        if "lora_merged" in plan["rollout"]:
            result["merge_enter_exit"] = bench.merge_cost(clock=args.clock)
        log(f"  model {name}: rollouts timed ({time.perf_counter() - start:.0f} s)")
        if not args.skip_decode and hasattr(bench.base, "generate"):
            from lora_runtime.bench.decode import time_decode  # deferred: start-up time

            batches = (8,) if args.preset == "smoke" else (1, 8, 32)
            result["decode"] = time_decode(bench, batches, budget_s=args.model_budget / 2, **reps)
            log(f"  model {name}: decode timed ({time.perf_counter() - start:.0f} s)")
    else:
        result["flop_limit"] = model_flop_limits(bench.lora_model())
    if args.profile:
        from lora_runtime.bench.profile import profile_train_steps  # deferred: start-up time

        eager = [v for v in plan["train"] if v not in ("lora_compiled", "peft_compiled")]
        result["profile"] = profile_train_steps(bench, eager)
        if not args.skip_decode and hasattr(bench.base, "generate"):
            from lora_runtime.bench.profile import profile_decode  # deferred: start-up time

            result["profile_decode"] = profile_decode(bench, batch=8)
        log(f"  model {name}: profiled ({time.perf_counter() - start:.0f} s)")
    result["notes"] = dict(bench.notes)
    return result


def run(args: argparse.Namespace, log=print) -> dict:
    """Runs the benchmark `args` describe and returns the JSON-ready result.

    Raises:
        SystemExit: a bad argument, before anything runs.
    """
    import torch

    from lora_runtime.bench.op import run_op_grid  # deferred: start-up time
    from lora_runtime.bench.timing import machine_info  # deferred: start-up time

    plan = _plan(args)
    device = plan["device"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device.type == "cpu" and load > 0.5 and args.clock == "wall":
        log(f"warning: load average {load:.2f} at start: other processes compete for the "
            f"{os.cpu_count()} cores; wall-clock figures (above all with several torch threads) "
            "will be noisy. On a shared machine, --threads 1 --clock cpu is steadier")
    result: dict = {"argv": args.argv, "preset": args.preset, "clock": args.clock,
                    "machine": machine_info(device), "op": None, "models": {}}
    start = time.perf_counter()
    if plan["groups"]:
        log(f"op level: {len(plan['groups'])} groups on {device}")
        rows, raw = run_op_grid(plan["groups"], device, budget_s=args.op_budget,
                                min_repeats=args.op_min_repeats, max_repeats=args.max_repeats,
                                log=log, clock=args.clock)
        result["op"] = {"rows": rows, "raw": raw, "seconds": time.perf_counter() - start}
    if not args.skip_decode:
        from lora_runtime.bench.decode import time_layer_calls  # deferred: start-up time

        result["layer_calls"] = time_layer_calls(budget_s=args.op_budget * 2, clock=args.clock,
                                                 min_repeats=args.op_min_repeats,
                                                 max_repeats=args.max_repeats)
    for name in plan["models"]:
        log(f"model level: {name}")
        result["models"][name] = _model_section(name, plan, args, log)
    if not args.skip_memory and plan["models"]:
        from lora_runtime.bench.memory import run_memory  # deferred: start-up time

        # After all timing: the children may then run side by side without disturbing it.
        parallel = args.memory_parallel or (1 if device.type == "cuda" else os.cpu_count() or 1)
        log(f"peak memory: {len(plan['models']) * len(plan['memory'])} child processes, "
            f"{parallel} at a time")
        memory = run_memory([(m, v) for m in plan["models"] for v in plan["memory"]],
                            str(device), parallel=parallel, threads=args.memory_threads, log=log)
        for name, figures in memory.items():
            result["models"][name]["memory"] = figures
    result["machine_end"] = {"loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    result["seconds"] = time.perf_counter() - start
    result["torch_threads"] = torch.get_num_threads()
    return result


def report(result: dict) -> str:
    """The printed report: op table, then per model its table and targets."""
    from lora_runtime.bench.report import (  # deferred: start-up time
        check_targets,
        format_global,
        format_model,
        format_op_table,
        format_targets,
    )

    m = result["machine"]
    load = [round(x, 2) for x in m["loadavg"] or []]
    load_end = [round(x, 2) for x in result["machine_end"]["loadavg"] or []]
    header = (f"lora-runtime bench ({result['preset']}) on {m['device']}: {m['cpu_model']}, "
              f"{m['torch_num_threads']} torch threads, load average {load} at start, "
              f"{load_end} at end; torch {m['torch']}, peft {m['peft']}, "
              f"transformers {m['transformers']}")
    parts = [header]
    if m.get("gpu"):
        parts.append(f"GPU: {m['gpu']}")
    parts.append(f"ratios are medians of interleaved repeats ({result['clock']} clock); "
                 "'limit' = FLOP limit")
    if result["op"]:
        parts.append(format_op_table(result["op"]["rows"]))
    if result.get("layer_calls") or result["op"]:
        parts.append(format_global(result))
    for name, res in result["models"].items():
        parts.append(format_model(res))
        if res.get("profile"):
            from lora_runtime.bench.profile import format_profile  # deferred: start-up time

            parts.append(format_profile(name, res["profile"]))
            if res.get("profile_decode"):
                parts.append(format_profile(name + " decode b8", res["profile_decode"]))
        res["targets"] = check_targets(res)
        parts.append(format_targets(name, res["targets"]))
    parts.append(f"total {result['seconds']:.0f} s")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lora-runtime bench` (see `--help`). Returns the exit status.

    `lora-runtime bench time-to-success ...` and `lora-runtime bench rl-loop ...` run the RL
    benchmarks (`bench.time_to_success`, `bench.rl_loop`) with their own options."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["time-to-success"], ["rl-loop"]):
        from lora_runtime.bench import rl_loop, time_to_success  # deferred: start-up time

        return {"time-to-success": time_to_success, "rl-loop": rl_loop}[argv[0]].main(argv[1:])
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    import torch

    if args.threads is not None and args.threads >= 1:  # < 1 is refused by _plan
        torch.set_num_threads(args.threads)
    if args.memory_variant:  # child process of run_memory
        from lora_runtime.bench.memory import measure_memory  # deferred: start-up time

        if not args.model:
            raise SystemExit("bench: --memory-variant needs --model")
        print(json.dumps(measure_memory(args.model, args.memory_variant, str(_device(args.device)))))
        return 0
    result = run(args, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    text = report(result)
    path = Path(args.json_path or f"runs/bench/bench-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(str(path), json.dumps(result, indent=1))
    print(text)
    print(f"\nraw figures: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
