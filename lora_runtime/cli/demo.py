"""`lora-runtime demo` (`make demo`): new -> resume, with full alongside, then one comparison table.

Each run is `lora-runtime train` in its own process (so each reports its own peak memory)
with `runner.overwrite=true`: a demo replaces the results of the previous demo. The
resume run always points at the adapter the new run just saved. Full fine-tuning does not
depend on the other two, so it runs at the same time in a second process (one core each:
the configs set `num_threads: 1`), its output in `<full run>/train.log`. A failure of
either stops the demo with that run's exit status; Ctrl-C reaches both (each saves).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from lora_runtime._fs import read_json_object
from lora_runtime.cli.console import print_table
from lora_runtime.cli.exit_codes import EXIT_INTERRUPTED
from lora_runtime.config import load_config
from lora_runtime.errors import UsageError
from lora_runtime.rl.outputs import read_metrics

RUNS = ("lora_new", "lora_resume", "full")
ALONGSIDE = "full"  # the run that does not depend on the others: it runs next to them
LOG_NAME = "train.log"  # the output of the run alongside, in its run folder


@dataclass
class DemoRun:
    name: str
    config: str
    overrides: list[str]
    output_dir: str
    wall_s: float = 0.0


def plan_demo(configs_dir: str, output_root: str | None, overrides: Sequence[str]) -> list[DemoRun]:
    """The three runs with their overrides; every config is validated before anything runs.

    Raises:
        UsageError: a config file is missing.
        ConfigError: a config (with the overrides) does not validate.
    """
    runs: list[DemoRun] = []
    for name in RUNS:
        path = os.path.join(configs_dir, f"{name}.yaml")
        if not os.path.isfile(path):
            raise UsageError(f"demo: {path} is missing; run the demo from the project folder or pass --configs DIR")
        sets = list(overrides) + ["runner.overwrite=true"]
        if output_root is not None:
            sets.append(f"runner.output_dir={os.path.join(output_root, name)}")
        if name == "lora_resume":
            sets.append(f"actor.model.lora_path={os.path.join(runs[0].output_dir, 'adapter')}")
        cfg = load_config(path, sets)
        runs.append(DemoRun(name, path, sets, cfg.runner.output_dir))
    return runs


def _command(run: DemoRun) -> list[str]:
    cmd = [sys.executable, "-m", "lora_runtime", "train", run.config]
    for s in run.overrides:
        cmd += ["--set", s]
    return cmd


def _shown(run: DemoRun) -> str:
    return f"lora-runtime train {run.config} " + " ".join(f"--set {s}" for s in run.overrides)


def _wait(proc: subprocess.Popen) -> int:
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # the child got the same Ctrl-C: let it save and finish
        code = proc.wait()
        code = code if code else EXIT_INTERRUPTED
    return code


def _train(run: DemoRun) -> int:
    print(f"\n=== {run.name}: {_shown(run)}", flush=True)
    start = time.perf_counter()
    code = _wait(subprocess.Popen(_command(run)))
    run.wall_s = time.perf_counter() - start
    return code


class Alongside:
    """A run in its own process next to the others; its output goes to `LOG_NAME` in its run folder."""

    def __init__(self, run: DemoRun) -> None:
        self.run, self.log = run, os.path.join(run.output_dir, LOG_NAME)
        try:
            os.makedirs(run.output_dir, exist_ok=True)
            with open(self.log, "w", encoding="utf-8") as out:  # the child keeps its own copy of the handle
                print(f"\n=== {run.name} (alongside, output in {self.log}): {_shown(run)}", flush=True)
                self.proc = subprocess.Popen(_command(run), stdout=out, stderr=subprocess.STDOUT)
        except OSError as exc:
            raise UsageError(f"demo: cannot write {self.log} ({exc.strerror}); pass --output-root DIR with a "
                             "writable folder") from None
        start = time.perf_counter()
        self._timer = threading.Thread(target=self._time, args=(start,), daemon=True)
        self._timer.start()

    def _time(self, start: float) -> None:
        self.proc.wait()
        self.run.wall_s = time.perf_counter() - start

    def wait(self, stop: bool = False) -> int:
        """Its exit status; `stop`: ask it to stop first (SIGTERM: it saves after its step)."""
        if stop and self.proc.poll() is None:
            self.proc.terminate()
        code = _wait(self.proc)
        self._timer.join()
        if code != 0:
            print(f"demo: {self.run.name} stopped with exit status {code}; its output is in {self.log}", file=sys.stderr)
        return code


def _build_base(run: DemoRun) -> None:
    """The shared built-in base (warm start), once, before the two processes that load it start."""
    cfg = load_config(run.config, run.overrides)
    if cfg.actor.model.model_path is not None:
        return
    from lora_runtime._threads import num_threads  # deferred: loads torch
    from lora_runtime.rl.builtin_base import ensure_builtin_base  # deferred: loads torch

    with num_threads(cfg.runner.num_threads):
        ensure_builtin_base(cfg)


def run_demo(configs_dir: str, output_root: str | None, overrides: Sequence[str] = ()) -> int:
    """Runs new -> resume with full alongside and prints the comparison; returns the exit status."""
    runs = plan_demo(configs_dir, output_root, overrides)
    start = time.perf_counter()
    _build_base(runs[0])
    alongside = Alongside(next(r for r in runs if r.name == ALONGSIDE))
    code = 0
    try:
        for run in (r for r in runs if r.name != ALONGSIDE):
            code = _train(run)
            if code != 0:
                print(f"demo: {run.name} stopped with exit status {code}; later runs skipped", file=sys.stderr)
                break
    except KeyboardInterrupt:  # between two runs
        code = EXIT_INTERRUPTED
    # Ctrl-C reached the run alongside too: wait for its save. Another failure stops it.
    side = alongside.wait(stop=code not in (0, EXIT_INTERRUPTED))
    if code != 0 or side != 0:
        return code or side
    print_comparison(runs)
    from lora_runtime.cli.evaluate import evaluate_demo  # deferred: loads torch

    evaluate_demo(runs)
    print(f"total demo time {time.perf_counter() - start:.0f} s")  # once, at the very end (evaluation included)
    return 0


def print_comparison(runs: Sequence[DemoRun]) -> None:
    """The demo's table, read back from each run's `summary.json` and `metrics.jsonl`."""
    rows, notes = [], []
    summaries = {}
    for run in runs:
        s = read_json_object(os.path.join(run.output_dir, "summary.json"))
        summaries[run.name] = s
        steps = read_metrics(os.path.join(run.output_dir, "metrics.jsonl"))
        rows.append((
            run.name, s["mode"], f"{steps[0]['step']}-{steps[-1]['step']}",
            f"{s['first_reward']:.3f}", f"{s['final_reward']:.3f}",
            f"{s['trainable_params']:,} / {s['total_params']:,}",
            f"{s['step_time_s'] * 1000:.0f} ms", f"{s['peak_memory_mb']:.0f} MB",
            f"{s['training_memory_mb']:.2f} MB", f"{run.wall_s:.0f} s",
        ))
    chance = summaries[runs[0].name]["chance_reward"]
    print()
    print_table(
        f"demo: new -> resume -> full (chance reward {chance:.4f}; rewards are means over 5 steps)",
        ["run", "mode", "steps", "first reward", "final reward", "trainable / total params",
         "step time", "peak memory", "train state", "wall time"],
        rows,
    )
    new, resume = summaries.get("lora_new"), summaries.get("lora_resume")
    if new and resume:
        notes.append(f"resume started at {resume['first_reward']:.3f} (the new run ended at {new['final_reward']:.3f}; "
                     f"chance is {chance:.4f}) and ended at {resume['final_reward']:.3f}")
    notes.append(f"peak memory: {summaries[runs[0].name]['peak_memory_kind']} of each run's process; train state: "
                 "weights + gradients + optimizer state + frozen reference copy (full mode)")
    notes.append("curves in each run's curves.png, per-step numbers in metrics.jsonl")
    for note in notes:
        print(note)
