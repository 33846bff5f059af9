"""The work behind `lora-runtime export`: a run's actor as a TorchScript file or an
AOTInductor package (see `lora_runtime.deploy`).

The exported forward is the one the update runs (the model family's `export_call` on the
task's example inputs): for the built-in actor `forward(pixel_values [B, 3, H, W],
input_ids [B, T]) -> logits [B, T, V]`, for a transformers model `forward(input_ids
[B, S + T]) -> logits` (the view's S words, then the prompt). On the reach task T = 3
prompt tokens + all but the last action token, so position 2 gives the first action and
position 3 the second; on an episodic task the action is read at the prompt's last token.
The batch size is free in an AOTInductor package; the other sizes are fixed to the task's.
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
from lora_runtime.rl.actor_builder import build_actor
from lora_runtime.rl.models import family_of
from lora_runtime.rl.tasks import build_task

SUFFIX = {"torchscript": ".pt", "aoti": ".pt2"}


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
    """The module to export and inputs shaped like the update's (the task's example batch)."""
    family = family_of(model)
    return family.export_call(model, build_task(run_cfg, model).example_inputs())


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
    model = build_actor(run_cfg, log=lambda m: print(m, file=sys.stderr), cache_base=False).eval()
    module, inputs = example_inputs(run_cfg, model)
    if fmt == "torchscript":
        export_torchscript(module, inputs, path, method=family_of(model).export_method, merged=merged)
    else:
        export_aoti(module, inputs, path, merged=merged)
    shapes = ", ".join(f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in inputs)
    library = "" if merged or not needs_op_library(model) else (
        "; load the op library first: torch.ops.load_library(lora_runtime.ops.library_path())")
    print(f"wrote {path} ({fmt}{', merged' if merged else ''}); example inputs: {shapes}{library}")
    return 0
