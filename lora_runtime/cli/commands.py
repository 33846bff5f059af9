"""The work behind `lora-runtime train`, `inspect` and `merge` (the CLI only parses)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from lora_runtime.adapters import (
    AdapterError,
    apply_and_load_adapter,
    iter_lora_layers,
    merge_lora,
    read_adapter,
    trainable_summary,
    unwrap_model,
)
from lora_runtime.cli.console import ConsoleDisplay, print_table
from lora_runtime.cli.exit_codes import EXIT_INTERRUPTED
from lora_runtime.config import ConfigError, RunConfig, load_config
from lora_runtime.rl.actor_setup import base_path, build_actor, load_base
from lora_runtime.rl.hf_loading import save_model_folder
from lora_runtime.rl.outputs import UsageError, check_output_dir
from lora_runtime.rl.trainer import train


@contextmanager
def prefixed_errors(source: str) -> Iterator[None]:
    """Prefixes errors raised while running `source` with its file name."""
    try:
        yield
    except (ConfigError, AdapterError, UsageError) as exc:
        text = str(exc)
        if text.startswith(source):
            raise
        raise type(exc)(f"{source}: {text}") from None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_train(config: str, overrides: Sequence[str] = ()) -> int:
    """`lora-runtime train`: returns 0, or 130 when Ctrl-C stopped the run (after saving)."""
    run_cfg = load_config(config, list(overrides))
    with prefixed_errors(config):
        result = train(run_cfg, log=_log, display=ConsoleDisplay())
    if result.interrupted:
        s = result.summary
        _log(f"interrupted after step {s['last_step']}: saved {result.output_dir} "
             "(weights, train_state/, metrics.jsonl); a resume run continues from there")
        return EXIT_INTERRUPTED
    return 0


def run_inspect(config: str, overrides: Sequence[str] = ()) -> int:
    """`lora-runtime inspect`: the mode, patched modules and parameter counts; writes nothing."""
    run_cfg = load_config(config, list(overrides))
    mc = run_cfg.actor.model
    with prefixed_errors(config):
        base = base_path(run_cfg)
        have_base = os.path.isfile(os.path.join(base, "model.safetensors")) or mc.model_path is not None
        model = build_actor(run_cfg, create_base=False, log=_log)
    describe = {
        "new": f"new LoRA adapter, rank {mc.lora_rank}",
        "resume": f"resume the LoRA adapter in {mc.lora_path}",
        "full": "full fine-tuning (no adapter; every parameter trains)",
    }[mc.mode]
    print(f"config: {config}\nmode:   {mc.mode} ({describe})")
    print(f"base:   {base}" + ("" if have_base else "  (not built yet: built-in sizes shown with initial weights)"))
    layers = list(iter_lora_layers(model))
    if layers:
        rows = [
            (path, f"{layer.in_features}", f"{layer.out_features}", f"{layer.r}", f"{layer.lora_alpha:g}",
             f"{layer.scaling:g}", f"{layer.lora_A.weight.numel() + layer.lora_B.weight.numel():,}")
            for path, layer in layers
        ]
        print_table(f"patched modules ({len(layers)})", ["module", "in", "out", "rank", "alpha", "scaling", "lora params"], rows)
    else:
        inner = unwrap_model(model)
        rows = [(name, f"{sum(p.numel() for p in child.parameters()):,}") for name, child in inner.named_children()]
        print_table("modules (all trainable)", ["module", "params"], rows)
    print(trainable_summary(model))
    return 0


def _merge_config(adapter: str, config: str | None, overrides: Sequence[str]) -> tuple[RunConfig, str]:
    if config is None:
        config = os.path.join(os.path.dirname(os.path.abspath(adapter.rstrip("/\\"))), "config.yaml")
        if not os.path.isfile(config):
            raise UsageError(
                f"merge: no CONFIG given and no config.yaml beside the adapter ({config}); pass the run's "
                "YAML (e.g. configs/lora_new.yaml) so the base model is known"
            )
    run_cfg = load_config(config, list(overrides))
    update = {"is_lora": True, "lora_path": None}
    model_cfg = run_cfg.actor.model.model_copy(update=update)
    return run_cfg.model_copy(update={"actor": run_cfg.actor.model_copy(update={"model": model_cfg})}), config


def run_merge(adapter: str, out: str, config: str | None, overrides: Sequence[str] = ()) -> int:
    """`lora-runtime merge`: writes base + adapter, merged, to a new model folder."""
    out_abs = os.path.abspath(out)
    if os.path.exists(out_abs) and (not os.path.isdir(out_abs) or os.listdir(out_abs)):
        raise UsageError(f"merge --out {out!r} already exists and is not an empty folder; nothing was "
                         "changed. Pick a new folder for the merged model")
    check_output_dir(out, overwrite=True, key="merge --out")
    run_cfg, config = _merge_config(adapter, config, overrides)
    with prefixed_errors(config):
        try:
            files = read_adapter(adapter)  # a bad adapter fails before the base is built or written
        except AdapterError as exc:
            raise AdapterError(f"merge --adapter {adapter!r}: {exc}") from None
        model = load_base(run_cfg, log=_log)
        try:
            apply_and_load_adapter(model, files)
        except AdapterError as exc:
            raise AdapterError(f"merge --adapter {adapter!r}: {exc}") from None
        merge_lora(model)
        save_model_folder(model, out_abs, merged_from={"base": base_path(run_cfg), "adapter": os.path.abspath(adapter)})
    print(f"merged {adapter} into the base {base_path(run_cfg)}: wrote {out_abs}/ (config.json + safetensors)")
    return 0
