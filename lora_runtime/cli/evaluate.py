"""`lora-runtime eval`: greedy success rate and mean return on held-out seeds.

    lora-runtime eval CONFIG [--episodes N] [--adapter DIR | --merged] [--json FILE] [--set ...]

The model is the config's base (`model_path`, or the built-in warm-started base), with the
config's `lora_path` adapter when it has one; `--adapter DIR` evaluates that adapter on the
base instead; `--merged` folds the adapter into the base weights first (`merge_lora`) and
evaluates the plain merged model. A full-mode run's `model/` is evaluated with
`--set actor.model.model_path=<run>/model`. The base of an adapter is the one it was trained
on (`rl.builtin_base`). Nothing is written but `--json FILE`: a built-in base that is not
there is built in memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from lora_runtime._fs import write_json_atomic
from lora_runtime._threads import num_threads
from lora_runtime.adapters import apply_and_load_adapter, merge_lora
from lora_runtime.cli.commands import _log, prefixed_errors
from lora_runtime.cli.console import print_table
from lora_runtime.config import RunConfig, load_config
from lora_runtime.errors import AdapterError, UsageError
from lora_runtime.rl.builtin_base import load_base
from lora_runtime.rl.tasks import build_task, task_class

DEMO_TARGET = 0.85  # greedy held-out success of lora_new the demo aims at


def evaluate_config(run_cfg: RunConfig, episodes: int | None, adapter: str | None, merged: bool) -> dict[str, Any]:
    """Builds the model `eval` describes and returns its held-out results.

    Raises:
        UsageError: a task without held-out evaluation, `--merged` without an adapter, or
            episodes < 1.
        AdapterError: an adapter folder that cannot be loaded (names `--adapter`).
    """
    if not task_class(run_cfg.task.kind).held_out_eval:
        raise UsageError(f"eval needs a task with held-out seeds or prompts (task.kind: babyai, gym or text); task.kind: "
                         f"{run_cfg.task.kind} reports its reward in metrics.jsonl")
    if episodes is not None and episodes < 1:
        raise UsageError(f"eval --episodes {episodes}: must be at least 1")
    adapter = adapter or run_cfg.actor.model.lora_path
    if merged and adapter is None:
        raise UsageError("eval --merged needs an adapter to merge: pass --adapter DIR (or a config with lora_path)")
    with num_threads(run_cfg.runner.num_threads):
        model = load_base(run_cfg, log=_log, cache=False, adapter=adapter)  # the adapter's own base
        task = build_task(run_cfg, model)
        if adapter is not None:
            try:
                apply_and_load_adapter(model, adapter)
            except AdapterError as exc:
                raise AdapterError(f"eval --adapter {adapter!r}: {exc}") from None
            if merged:
                merge_lora(model)
        result = task.evaluate(model, episodes)
    model_path = run_cfg.actor.model.model_path
    plain = "base" if model_path is None else f"model {model_path}"  # a full run's model/ is not "base"
    what = plain if adapter is None else f"{'merged ' if merged else ''}{adapter}"
    return {**result, "model": what, "task": task.title}


def std_error(rate: float, n: int) -> float:
    """Standard error of a success rate over `n` independent episodes: sqrt(p (1 - p) / n)."""
    return math.sqrt(rate * (1.0 - rate) / n)


def print_eval(rows: Sequence[dict[str, Any]], title: str) -> None:
    """One table row per evaluated model (success rate with its standard error)."""
    print_table(title, ["model", "episodes (held-out seeds)", "success rate ± std error", "mean return", "mean length"], [
        (r["model"], f"{r['episodes']} ({r['first_seed']}..{r['first_seed'] + r['episodes'] - 1})",
         f"{r['success_rate']:.3f} ± {std_error(r['success_rate'], r['episodes']):.3f}", f"{r['reward_mean']:.3f}",
         f"{r['episode_len']:.1f}") for r in rows
    ])


def run_eval(config: str, episodes: int | None, adapter: str | None, merged: bool, overrides: Sequence[str] = (),
             json_path: str | None = None) -> int:
    """`lora-runtime eval`: prints the table (and writes `json_path`); returns 0."""
    run_cfg = load_config(config, list(overrides))
    if adapter is not None and not os.path.isdir(adapter):
        raise UsageError(f"eval --adapter {adapter!r}: no such folder; point it at a run's adapter/ folder")
    with prefixed_errors(config):
        row = evaluate_config(run_cfg, episodes, adapter, merged)
    print_eval([row], f"eval: {row['task']}, greedy")
    if json_path is not None:
        write_json_atomic(os.path.abspath(json_path), row)
    return 0


def evaluate_demo(runs: Sequence[Any]) -> None:
    """The demo's last table: the random policy, the warm start and the three runs, greedy on
    the same held-out seeds, also written to `eval.json` beside the runs; then whether
    `lora_new` reached the demo's target (greedy success >= 0.85)."""
    by_name = {r.name: r for r in runs}
    new_cfg = load_config(by_name["lora_new"].config, by_name["lora_new"].overrides)
    if not task_class(new_cfg.task.kind).held_out_eval:
        return
    with num_threads(new_cfg.runner.num_threads):
        base_task = build_task(new_cfg, load_base(new_cfg, log=_log, cache=False))
        rows = [{**base_task.evaluate_random(None), "model": "random policy", "task": base_task.title}]
    rows.append({**evaluate_config(new_cfg, None, None, False), "model": "warm start (base)"})
    for name in ("lora_new", "lora_resume"):
        if name in by_name:
            cfg = load_config(by_name[name].config, by_name[name].overrides)
            rows.append({**evaluate_config(cfg, None, os.path.join(by_name[name].output_dir, "adapter"), False),
                         "model": f"{name} (adapter)"})
    if "full" in by_name:
        run = by_name["full"]
        cfg = load_config(run.config, [*run.overrides, f"actor.model.model_path={os.path.join(run.output_dir, 'model')}"])
        rows.append({**evaluate_config(cfg, None, None, False), "model": "full (model/)"})
    print()
    print_eval(rows, f"demo: greedy evaluation on held-out seeds, {rows[0]['task']}")
    path = os.path.join(os.path.dirname(os.path.abspath(by_name["lora_new"].output_dir)), "eval.json")
    write_json_atomic(path, {"task": rows[0]["task"], "rows": rows})
    warm, new = rows[1]["success_rate"], rows[2]["success_rate"]
    verdict = "met" if new >= DEMO_TARGET - 1e-9 else "NOT met"
    gain_se = math.hypot(std_error(warm, rows[1]["episodes"]), std_error(new, rows[2]["episodes"]))
    print(f"target for lora_new: success >= {DEMO_TARGET:.2f}; got {new:.3f} (warm start {warm:.3f}, "
          f"gain {new - warm:+.3f} ± {gain_se:.3f}): {verdict}. The table is also in {path}")
