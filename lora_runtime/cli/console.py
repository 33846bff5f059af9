"""Terminal output: a live progress bar while training and tables afterwards (with rich).

On a terminal the bar redraws in place; otherwise (logs, CI, tests) a plain line is
printed every tenth of the run. Tables fall back to aligned plain text without rich.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from lora_runtime.rl.trainer import SUMMARY_WINDOW, Display

try:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table
except ImportError:  # pragma: no cover - rich is a dependency; keep working without it
    Console = None  # type: ignore[assignment,misc]


class ProgressBar:
    """Shows step, reward, KL and throughput while a run trains.

    Args:
        title: what runs (e.g. "lora_new (new)").
        total: number of steps.
        first_step: step number of the first step (a resumed run continues its numbering).
        enabled: False prints nothing.
    """

    def __init__(self, title: str, total: int, first_step: int = 1, enabled: bool = True) -> None:
        self.total, self.first, self.enabled = total, first_step, enabled
        self.title = title
        self.live = enabled and Console is not None and sys.stderr.isatty()
        self.every = max(1, total // 10)
        self._progress = None
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("step {task.fields[step]}  reward {task.fields[reward]}  kl {task.fields[kl]}  "
                           "{task.fields[rate]} samples/s"),
                TimeElapsedColumn(), console=Console(stderr=True), transient=False,
            )
            self._task = self._progress.add_task(title, total=total, step="-", reward="-", kl="-", rate="-")
            self._progress.start()

    def update(self, done: int, record: dict[str, Any]) -> None:
        """After each step: `done` steps of this run are finished; `record` is its metrics."""
        if not self.enabled:
            return
        fields = {
            "step": record["step"], "reward": f"{record['reward_mean']:.3f}",
            "kl": f"{record['kl']:.4f}", "rate": f"{record['samples_per_s']:.0f}",
        }
        if "success_rate" in record:  # multi-step tasks: success and environment steps per second
            fields["reward"] += f"  success {record['success_rate']:.2f}"
            fields["rate"] = f"{record['env_steps_per_s']:.0f} env steps/s, {record['samples_per_s']:.0f}"
        if self._progress is not None:
            self._progress.update(self._task, completed=done, **fields)
        elif done % self.every == 0 or done == self.total or done == 1:
            print(
                f"[{self.title}] step {fields['step']} ({done}/{self.total})  reward {fields['reward']}  "
                f"loss {record['loss']:.4f}  kl {fields['kl']}  {record['step_time_s']:.3f} s/step  "
                f"{fields['rate']} samples/s",
                file=sys.stderr, flush=True,
            )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _natural_width(table: Any) -> int:
    """Columns a rich table needs to print without wrapping a cell."""
    return Console(width=100_000).measure(table).maximum


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], file=None) -> None:
    """Prints a table (rich when available) to stdout or `file`."""
    cells = [[str(c) for c in row] for row in rows]
    if Console is not None:
        table = Table(title=title, title_justify="left")
        for i, name in enumerate(columns):
            table.add_column(name, justify="left" if i == 0 or len(columns) == 2 else "right")
        for row in cells:
            table.add_row(*row)
        out = file or sys.stdout
        # a pipe or a file (logs, tests): the table's natural width, so no row wraps (long run
        # folders wrapped at a fixed 160 columns and split a row in two)
        console = Console(file=out) if out.isatty() else Console(file=out, width=max(160, _natural_width(table)))
        console.print(table)
        out.flush()
        return
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    out = file or sys.stdout
    print(title, file=out)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=out)
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)), file=out)


def print_summary(summary: dict[str, Any]) -> None:
    """The end-of-run table."""
    weights = "adapter/" if summary["mode"] != "full" else "model/"
    rows = [
        ("mode", summary["mode"]),
        ("steps", f"{summary['steps_run']} (steps {summary['first_step']}-{summary['last_step']})"
         + ("  [interrupted]" if summary["interrupted"] else "")),
        ("reward: chance", f"{summary['chance_reward']:.4f}"),
        *([(f"success: first / last {SUMMARY_WINDOW} steps", (f"{summary['first_success']:.3f} / {summary['final_success']:.3f}"
            f"  ({summary['env_steps_per_s']:.0f} env steps/s in rollouts)"))] if "first_success" in summary else []),
        (f"reward: first {SUMMARY_WINDOW} steps", f"{summary['first_reward']:.3f}"),
        (f"reward: last {SUMMARY_WINDOW} steps", f"{summary['final_reward']:.3f}"),
        ("trainable / total params", f"{summary['trainable_params']:,} / {summary['total_params']:,}"),
        ("step time", f"{summary['step_time_s']:.3f} s ({summary['samples_per_s']:.0f} samples/s)"),
        ("memory", (f"peak {summary['peak_memory_mb']:.0f} MB ({summary['peak_memory_kind']}); weights, "
                    f"grads, optimizer, reference {summary['training_memory_mb']:.2f} MB")),
        ("outputs", f"{summary['output_dir']}/ ({weights} train_state/ metrics.jsonl curves.png)"),
    ]
    print_table(f"run summary: {os.path.basename(summary['output_dir'])}", ["", "value"], rows)


class ConsoleDisplay(Display):
    """The trainer's `Display` on a terminal: the progress bar, then the summary table."""

    def __init__(self) -> None:
        self.bar: ProgressBar | None = None

    def start(self, title: str, total: int, first_step: int) -> None:
        self.bar = ProgressBar(title, total, first_step)

    def step(self, done: int, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(done, record)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def summary(self, summary: dict[str, Any]) -> None:
        print_summary(summary)
