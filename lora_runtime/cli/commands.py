"""The work behind `lora-runtime train`, `inspect` and `merge` (the CLI only parses)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from lora_runtime._fs import removed_on_error
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
from lora_runtime.cli.exit_codes import EXIT_SIGNALLED
from lora_runtime.config import RunConfig, load_config
from lora_runtime.errors import ConfigError, UsageError
from lora_runtime.rl.actor_builder import build_actor
from lora_runtime.rl.builtin_base import base_path, load_base
from lora_runtime.rl.models import load_model_folder, read_model_folder, save_model_folder
from lora_runtime.rl.outputs import check_output_dir
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


RUN_MARKERS = ("metrics.jsonl", "summary.json")  # files every `train` run writes at its top


def check_not_in_run(path: str, key: str) -> None:
    """Refuses a path inside another run's results folder (an ancestor holding a run's
    `metrics.jsonl` / `summary.json`): writing there would mix outputs with that run's.

    Raises:
        UsageError: naming `key`, the path and the run folder.
    """
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        if any(os.path.isfile(os.path.join(folder, m)) for m in RUN_MARKERS):
            raise UsageError(
                f"{key}={path!r} is inside the results of the run in {folder}; nothing was changed. "
                "Write it to a folder of its own, outside that run"
            )
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_train(config: str, overrides: Sequence[str] = ()) -> int:
    """`lora-runtime train`: returns 0, or 130 / 143 when Ctrl-C / SIGTERM stopped the run
    (every rank finished its step and saved once)."""
    run_cfg = load_config(config, list(overrides))
    with prefixed_errors(config):
        check_not_in_run(run_cfg.runner.output_dir, "runner.output_dir")
        if run_cfg.runner.base_dir is not None:
            check_not_in_run(os.path.join(run_cfg.runner.base_dir, "x"), "runner.base_dir")
        result = train(run_cfg, log=_log, display=ConsoleDisplay())
    if result.interrupted:
        if result.is_main:  # one message per run, naming only what is on disk
            written = [os.path.relpath(p, result.output_dir) + ("/" if os.path.isdir(p) else "")
                       for p in result.saved if os.path.exists(p)]
            _log(f"stopped by {result.stop_signal} after step {result.summary['last_step']}: saved "
                 f"{', '.join(written)} in {result.output_dir}; a resume run continues from there")
        return EXIT_SIGNALLED[result.stop_signal]
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
                f"merge: no CONFIG or --base given and no config.yaml beside the adapter ({config}); "
                "name the base model folder with --base DIR, or pass the run's YAML (e.g. "
                "configs/lora_new.yaml)"
            )
    run_cfg = load_config(config, list(overrides))
    update = {"is_lora": True, "lora_path": None}
    model_cfg = run_cfg.actor.model.model_copy(update=update)
    return run_cfg.model_copy(update={"actor": run_cfg.actor.model_copy(update={"model": model_cfg})}), config


def _merge_base(base: str | None, adapter: str, config: str | None, overrides: Sequence[str]) -> Callable[[], nn.Module]:
    """Checks where the base comes from (without loading it); returns its loader."""
    if base is not None:
        if config is not None or overrides:
            raise UsageError(f"merge: --base {base!r} names the base model, so CONFIG and --set are not used; "
                             "pass either --base DIR or a run CONFIG, not both")
        read_model_folder(base, key="merge --base")
        return lambda: load_model_folder(base, key="merge --base")
    run_cfg, config = _merge_config(adapter, config, overrides)

    def load() -> nn.Module:  # the base the adapter was trained on; a missing one is built in memory
        with prefixed_errors(config):
            return load_base(run_cfg, log=_log, cache=False, adapter=adapter)

    with prefixed_errors(config):
        if run_cfg.actor.model.model_path is not None:
            read_model_folder(run_cfg.actor.model.model_path)
    return load


def run_merge(adapter: str, out: str, config: str | None, overrides: Sequence[str] = (),
              base: str | None = None) -> int:
    """`lora-runtime merge`: writes base + adapter, merged, to a new model folder.

    Every path is checked before the base is loaded: the adapter folder (read and
    validated), `--out` (new or empty, writable) and the base (`--base DIR`, or the run
    CONFIG, by default the `config.yaml` beside the adapter).
    """
    try:
        files = read_adapter(adapter)
    except AdapterError as exc:
        raise AdapterError(f"merge --adapter {adapter!r}: {exc}") from None
    out_abs = os.path.abspath(out)
    if os.path.exists(out_abs) and (not os.path.isdir(out_abs) or os.listdir(out_abs)):
        raise UsageError(f"merge --out {out!r} already exists and is not an empty folder; nothing was "
                         "changed. Pick a new folder for the merged model")
    check_output_dir(out, overwrite=True, key="merge --out")
    check_not_in_run(out, "merge --out")
    load = _merge_base(base, adapter, config, overrides)
    model = load()
    try:
        apply_and_load_adapter(model, files)
    except AdapterError as exc:
        raise AdapterError(f"merge --adapter {adapter!r}: {exc}") from None
    merge_lora(model)
    source = getattr(model, "name_or_path", None)
    with removed_on_error(out_abs):  # a failed write leaves no new folder (nor new parents)
        save_model_folder(model, out_abs, merged_from={"base": source, "adapter": os.path.abspath(adapter)})
    print(f"merged {adapter} into the base {source}: wrote {out_abs}/ (config.json + safetensors)")
    return 0
