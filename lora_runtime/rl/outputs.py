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

from lora_runtime._fs import check_writable, write_bytes_atomic
from lora_runtime.errors import UsageError

RESULT_NAMES = (
    "metrics.jsonl", "summary.json", "curves.png", "config.yaml", "adapter", "model", "train_state",
)


# ----------------------------------------------------------------------------- output folder


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def check_output_dir(output_dir: str, overwrite: bool, key: str = "runner.output_dir") -> str:
    """Makes sure a run may write to `output_dir`; leaves nothing (the folder is created
    later): a file is created and removed in the folder, or its nearest existing parent.

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
                "them with --set runner.overwrite=true"
            )
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        raise UsageError(f"{key}={output_dir!r} cannot be created: {existing} is a file; {fix}")
    try:
        check_writable(existing)
    except OSError as exc:
        raise UsageError(f"{key}={output_dir!r} is not writable (cannot create a file in {existing}: "
                         f"{exc.strerror or exc}); {fix}") from None
    return path


class MetricsWriter:
    """Appends one JSON object per step to `metrics.jsonl`, one whole line per `write` call
    and flushed, so the file is a log that grows by complete lines (the one file of a run
    that is appended to rather than replaced atomically).

    Args:
        path: the file; replaced (atomically) by `history`, then appended to.
        history: the records of earlier steps to keep (a run continued in place).
    """

    def __init__(self, path: str, history: Sequence[dict[str, Any]] = ()) -> None:
        self.path = path
        write_bytes_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in history).encode("utf-8"))
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

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
    """Writes the reward and loss curves as a PNG (`curves_figure`).

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
    fig = curves_figure(records, title)
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=100, bbox_inches="tight")  # "tight": the legends below too
    finally:
        plt.close(fig)
    write_bytes_atomic(path, png.getvalue())
    return None


def _legend_below(ax) -> None:
    """The legend under the panel, where it hides no curve."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize="small", frameon=False)


def curves_figure(records: Sequence[dict[str, Any]], title: str):
    """A matplotlib figure, one panel each: reward (with chance), success rate (multi-step
    tasks: with the warm start's and a random policy's levels), loss, KL to the reference.
    Legends sit below their panels. Needs matplotlib."""
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    success = "success_rate" in records[0]
    fig, axes = plt.subplots(1, 4 if success else 3, figsize=(17 if success else 13, 3.6))
    ax_r, ax_l, ax_k = axes[0], axes[-2], axes[-1]
    ax_r.plot(steps, [r["reward_mean"] for r in records], label="reward (mean of batch)")
    ax_r.axhline(records[0]["chance_reward"], color="grey", linestyle="--", label="chance")
    ax_r.set(xlabel="step", ylabel="reward", ylim=(-0.02, 1.02), title=f"{title}: reward")
    _legend_below(ax_r)
    if success:
        ax_s = axes[1]
        ax_s.plot(steps, [r.get("success_rate", float("nan")) for r in records], color="tab:orange", label="success rate")
        for key, style, label in (("warm_start_success", ":", "warm start success (greedy, held-out)"),
                                  ("random_success", "-.", "random policy success")):
            if key in records[0]:
                ax_s.axhline(records[0][key], color="black", linestyle=style, label=label)
        ax_s.set(xlabel="step", ylabel="success rate", ylim=(-0.02, 1.02), title=f"{title}: success")
        _legend_below(ax_s)
    ax_l.plot(steps, [r["loss"] for r in records], label="loss")
    ax_l.plot(steps, [r["pg_loss"] for r in records], label="policy-gradient part")
    ax_l.set(xlabel="step", title=f"{title}: loss")
    _legend_below(ax_l)
    ax_k.plot(steps, [r["kl"] for r in records], color="tab:green")
    ax_k.set(xlabel="step", title=f"{title}: KL to the reference policy")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- memory


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """`(megabytes, what was measured)`: CUDA peak allocated, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (kb / 2**20 if sys.platform == "darwin" else kb / 2**10), "process peak RSS"

