"""What a run leaves on disk: the output folder check, metrics, the curve, peak memory.

Every file and folder goes through `lora_runtime._fs` (atomic, synced), so an interrupted
run never leaves a half-written file behind; `metrics.jsonl` alone is a log that grows by
whole lines.
"""

from __future__ import annotations

import io
import json
import os
import resource
import sys
from collections.abc import Sequence
from typing import Any

import torch

from lora_runtime._fs import write_bytes_atomic
from lora_runtime.errors import UsageError

RESULT_NAMES = (
    "metrics.jsonl", "summary.json", "curves.png", "config.yaml", "adapter", "model", "train_state",
)


# ----------------------------------------------------------------------------- output folder


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def check_output_dir(output_dir: str, overwrite: bool, key: str = "trainer.output_dir") -> str:
    """Makes sure a run may write to `output_dir`; writes nothing (the folder is created later).

    Returns:
        The absolute path.

    Raises:
        UsageError: results of an earlier run are there and `overwrite` is false, or the
            folder cannot be created or written (the message names the key and the fix).
    """
    path = os.path.abspath(output_dir)
    fix = f"pick a folder you can write to with --set {key}=..."
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{key}={output_dir!r} is a file, not a folder; {fix}")
    if os.path.isdir(path) and not overwrite:
        found = [n for n in RESULT_NAMES if os.path.lexists(os.path.join(path, n))]
        if found:
            raise UsageError(
                f"{key}={output_dir!r} already holds the results of a run ({', '.join(found)}); "
                f"nothing was changed. Pick another folder (--set {key}=...) or allow replacing "
                "them with --set trainer.overwrite=true"
            )
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        raise UsageError(f"{key}={output_dir!r} cannot be created: {existing} is a file; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{key}={output_dir!r} is not writable (no write permission on {existing}); {fix}")
    return path


class MetricsWriter:
    """Appends one JSON object per step to `metrics.jsonl`, one whole line per `write` call
    and flushed, so the file is a log that grows by complete lines (the one file of a run
    that is appended to rather than replaced atomically)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, sort_keys=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- curve


def plot_curves(records: Sequence[dict[str, Any]], path: str, title: str) -> str | None:
    """Writes the reward and loss curves as a PNG.

    Returns:
        None when written, else why not (matplotlib missing, no records).
    """
    if not records:
        return "no steps were run"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'lora-runtime[plot]')"
    steps = [r["step"] for r in records]
    fig, (ax_r, ax_l, ax_k) = plt.subplots(1, 3, figsize=(13, 3.6))
    ax_r.plot(steps, [r["reward_mean"] for r in records], label="reward (mean of batch)")
    ax_r.axhline(records[0]["chance_reward"], color="grey", linestyle="--", label="chance")
    if "success_rate" in records[0]:  # multi-step tasks: success, with the warm start's and random's levels
        ax_r.plot(steps, [r["success_rate"] for r in records], label="success rate")
        for key, style, label in (("warm_start_success", ":", "warm start success (greedy, held-out)"),
                                  ("random_success", "-.", "random policy success")):
            if key in records[0]:
                ax_r.axhline(records[0][key], color="black", linestyle=style, label=label)
    ax_r.set(xlabel="step", ylabel="reward", ylim=(-0.02, 1.02), title=f"{title}: reward")
    ax_r.legend(loc="lower right")
    ax_l.plot(steps, [r["loss"] for r in records], label="loss")
    ax_l.plot(steps, [r["pg_loss"] for r in records], label="policy-gradient part")
    ax_l.set(xlabel="step", title=f"{title}: loss")
    ax_l.legend(loc="best")
    ax_k.plot(steps, [r["kl"] for r in records], color="tab:green")
    ax_k.set(xlabel="step", title=f"{title}: KL to the reference policy")
    fig.tight_layout()
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=100)
    finally:
        plt.close(fig)
    write_bytes_atomic(path, png.getvalue())
    return None


# ----------------------------------------------------------------------------- memory


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """`(megabytes, what was measured)`: CUDA peak allocated, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (kb / 2**20 if sys.platform == "darwin" else kb / 2**10), "process peak RSS"

