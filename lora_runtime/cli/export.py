"""The work behind `lora-runtime export`: a run's actor as a TorchScript file or an
AOTInductor package (see `lora_runtime.deploy`).

The exported forward is the one the GRPO update runs (`rl.grpo`): for the built-in actor
`forward(pixel_values [B, 3, H, W], input_ids [B, T])`, for a transformers model
`forward(input_ids [B, S + T]) -> logits` (the board's S cell tokens, then the text), with
T = 3 prompt tokens + all but the last action token. Logits are causal, so position 2 gives
the first action and position 3 the second. The batch size is free in an AOTInductor
package; the other sizes are fixed to the task's.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import nn

from lora_runtime.cli.commands import check_not_in_run
from lora_runtime.config import load_config
from lora_runtime.deploy import check_output_file, export_aoti, export_torchscript, needs_op_library
from lora_runtime.errors import UsageError
from lora_runtime.rl.actor_setup import build_actor, make_task
from lora_runtime.rl.models.vla import TinyVLA

SUFFIX = {"torchscript": ".pt", "aoti": ".pt2"}


class LogitsOnly(nn.Module):
    """A transformers causal LM as `forward(input_ids) -> logits [B, T, V]` (tensors only,
    as TorchScript tracing and `torch.export` want)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def _check_out(out: str, fmt: str) -> str:
    """`deploy.check_output_file` (no overwriting) as a usage error, then: not inside a run."""
    try:
        path = check_output_file(out, SUFFIX[fmt], overwrite=False)
    except ValueError as exc:
        raise UsageError(f"export --out {out!r}: {exc}; pass --out PATH{SUFFIX[fmt]} (a {fmt} file), "
                         "a new file in an existing, writable folder; nothing was changed") from None
    check_not_in_run(out, "export --out")
    return path


def example_inputs(run_cfg, model: nn.Module) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The module to export and inputs shaped like a GRPO update's (batch 2)."""
    task = make_task(run_cfg, model)
    scenes = task.sample(2, torch.Generator().manual_seed(0))
    actions = torch.zeros(2, task.num_actions - 1, dtype=torch.long)  # placeholders: causal logits
    text = torch.cat([scenes.prompt_ids, actions], dim=1)  # [2, 3 + A - 1]
    if isinstance(model, TinyVLA):
        return model, (scenes.pixel_values, text)
    return LogitsOnly(model), (torch.cat([scenes.scene_ids, text], dim=1),)


def run_export(config: str, fmt: str, merged: bool, out: str, overrides: Sequence[str] = ()) -> int:
    """`lora-runtime export`: writes one TorchScript file or AOTInductor package."""
    path = _check_out(out, fmt)
    run_cfg = load_config(config, list(overrides))
    mc = run_cfg.actor.model
    if mc.mode == "new":
        raise UsageError(
            f"{config}: actor.model.lora_path is null, so the actor would get fresh adapters (lora_B = 0): "
            "nothing trained to export. Name the trained adapter with --set actor.model.lora_path=RUN/adapter "
            "(or a full-mode model folder with actor.model.model_path and is_lora=false)"
        )
    if merged and mc.mode == "full":
        raise UsageError(f"{config}: --merged needs a LoRA adapter, but actor.model.is_lora is false (full mode)")
    model = build_actor(run_cfg, log=lambda m: print(m, file=sys.stderr)).eval()
    module, inputs = example_inputs(run_cfg, model)
    if fmt == "torchscript":
        method = "script" if isinstance(model, TinyVLA) else "trace"  # transformers models do not script
        export_torchscript(module, inputs, path, method=method, merged=merged)
    else:
        export_aoti(module, inputs, path, merged=merged)
    shapes = ", ".join(f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in inputs)
    library = "" if merged or not needs_op_library(model) else (
        "; load the op library first: torch.ops.load_library(lora_runtime.ops.library_path())")
    print(f"wrote {path} ({fmt}{', merged' if merged else ''}); example inputs: {shapes}{library}")
    return 0
