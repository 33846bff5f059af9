"""Finds the target `nn.Linear` modules of a model and swaps `LoRALinear` in and out."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lora_runtime.config import DEFAULT_TARGETS, ActorModelConfig
from lora_runtime.layer import LoRALinear

__all__ = [
    "DEFAULT_TARGETS",
    "TrainableSummary",
    "apply_lora",
    "iter_lora_layers",
    "matches_target",
    "prepare_actor",
    "remove_lora",
    "trainable_summary",
    "unwrap_model",
]


def matches_target(name: str, targets: Iterable[str]) -> bool:
    """True when a dotted module name ends with one of `targets` on a dot boundary.

    `"model.layers.0.self_attn.q_proj"` matches `"q_proj"` and `"self_attn.q_proj"`;
    `"attn.q_proj"` does not match `"proj"` (as in PEFT).
    """
    return any(name == t or name.endswith("." + t) for t in targets)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside `torch.compile` (`_orig_mod`) and DDP (`module`) wrappers."""
    while True:
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def iter_lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Yields `(module path, LoRALinear)` for every patched module, in module order.

    Paths are those of the unwrapped model (no `_orig_mod.` / `module.` prefixes).
    """
    for name, module in unwrap_model(model).named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def find_targets(
    model: nn.Module,
    target_modules: Iterable[str] = DEFAULT_TARGETS,
    exclude_modules: Iterable[str] = (),
) -> list[tuple[str, nn.Linear]]:
    """The `nn.Linear` modules `apply_lora` would patch, as `(path, module)`.

    Warns once about target names that hit modules of other types (they are skipped).
    """
    model = unwrap_model(model)
    targets, excludes = tuple(target_modules), tuple(exclude_modules)
    found: list[tuple[str, nn.Linear]] = []
    skipped: list[str] = []
    lora_paths = [n for n, _ in iter_lora_layers(model)]
    for name, module in model.named_modules():
        if not name or any(name == p or name.startswith(p + ".") for p in lora_paths):
            continue  # the root, or inside an already patched layer
        if not matches_target(name, targets) or matches_target(name, excludes):
            continue
        if isinstance(module, nn.Linear):
            found.append((name, module))
        else:
            skipped.append(f"{name} ({type(module).__name__})")
    if skipped:
        shown = ", ".join(skipped[:8]) + (f", ... ({len(skipped)} in all)" if len(skipped) > 8 else "")
        warnings.warn(
            f"apply_lora: skipping modules that match a target but are not nn.Linear: {shown}",
            UserWarning,
            stacklevel=3,
        )
    return found


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: Iterable[str] = DEFAULT_TARGETS,
    exclude_modules: Iterable[str] = (),
    init: str = "gaussian",
    use_rslora: bool = False,
) -> nn.Module:
    """Replaces every targeted `nn.Linear` of `model` with a `LoRALinear`, in place.

    Args:
        model: any module; it knows nothing of LoRA.
        rank: adapter rank r.
        alpha: `lora_alpha`; None means `rank` (scaling 1.0).
        dropout: LoRA dropout probability.
        target_modules: names matched on the last dotted component(s) of module paths.
        exclude_modules: names (same matching) never patched.
        init: "gaussian" or "kaiming" (B is zero either way, so outputs are unchanged).
        use_rslora: scaling `alpha / sqrt(r)`.

    Returns:
        `model`, patched.

    Raises:
        ValueError: no module matched (the message lists the targets and some linear
            module names of the model), or a rank that does not fit a module (named).
            Nothing is patched when an error is raised.
    """
    model_ = unwrap_model(model)
    targets = tuple(target_modules)
    found = find_targets(model_, targets, exclude_modules)
    if not found:
        linears = [n for n, m in model_.named_modules() if isinstance(m, nn.Linear)]
        sample = ", ".join(linears[:10]) or "none"
        raise ValueError(
            f"apply_lora: no nn.Linear module matches target_modules={list(targets)} "
            f"(exclude_modules={list(exclude_modules)}). Linear modules in this model: {sample}"
            + (" ..." if len(linears) > 10 else "")
        )
    for name, module in found:  # validate everything before changing anything
        limit = min(module.in_features, module.out_features)
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= limit:
            raise ValueError(
                f"apply_lora: rank={rank!r} does not fit module '{name}' "
                f"(Linear({module.in_features}, {module.out_features})): allowed 1 <= r <= {limit}"
            )
    layers = [
        (name, LoRALinear(module, rank, alpha, dropout, use_rslora=use_rslora, init=init))
        for name, module in found
    ]
    for name, layer in layers:
        _set_submodule(model_, name, layer)
    return model


@torch.no_grad()
def remove_lora(model: nn.Module, merge: bool) -> nn.Module:
    """Puts plain `nn.Linear` modules back in place of every `LoRALinear`.

    Args:
        model: a patched model.
        merge: fold `scaling * B @ A` into the base weight (`merge.merge_lora`: summed in
            float32, float64 for float64 weights, rounded once); False drops the adapters
            and keeps the base weights.

    Returns:
        `model`, unpatched.

    Raises:
        RuntimeError: a layer is currently merged by `merged(...)` (leave that first).
        ValueError / MergeError: `merge=True` and `merge_lora` refuses (non-finite adapter,
            adapters disabled, tied base weight); nothing is changed.
    """
    layers = list(iter_lora_layers(model))
    for name, layer in layers:
        if layer.merged:
            raise RuntimeError(
                f"remove_lora: layer '{name}' is merged by merged(...); leave that context first"
            )
    if merge and layers:
        from lora_runtime.merge import merge_lora  # merge builds on this module

        return merge_lora(model)  # checks everything, merges, then calls merge=False here
    for name, layer in layers:
        _set_submodule(unwrap_model(model), name, layer.base_layer)
    return model


@dataclass(frozen=True)
class TrainableSummary:
    """Parameter counts of a model (shared parameters counted once)."""

    trainable: int
    total: int

    @property
    def percentage(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,d} || all params: {self.total:,d} "
            f"|| trainable%: {self.percentage:.4f}"
        )


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Counts trainable and total parameters, as PEFT's `print_trainable_parameters` prints."""
    params = list(model.parameters())  # deduplicated by identity
    return TrainableSummary(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
    )


def mark_only_lora_trainable(model: nn.Module) -> None:
    """`requires_grad` True on adapter parameters, False on everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in iter_lora_layers(model):
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)


def prepare_actor(model: nn.Module, model_cfg: ActorModelConfig) -> nn.Module:
    """Applies the config's mode to a freshly loaded base model.

    - "new": patch the targets with rank `lora_rank` adapters (Gaussian init by default);
      only adapter parameters train.
    - "resume": patch with the r / alpha / targets of `lora_path/adapter_config.json`,
      load its weights; only adapter parameters train.
    - "full": nothing is patched; every parameter trains.

    Args:
        model: the base model (unpatched).
        model_cfg: the validated `actor.model` section.

    Returns:
        `model`, prepared in place.

    Raises:
        ValueError: see `apply_lora`.
        AdapterError: resume with a missing, malformed or mismatching adapter (the model is
            left unpatched).
    """
    if any(True for _ in iter_lora_layers(model)):
        raise ValueError("prepare_actor: the model is already patched; pass the base model")
    mode = model_cfg.mode
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if mode == "new":
        apply_lora(
            model,
            rank=model_cfg.lora_rank,
            alpha=model_cfg.lora_alpha,
            dropout=model_cfg.lora_dropout,
            target_modules=model_cfg.target_modules,
            exclude_modules=model_cfg.exclude_modules,
            init=model_cfg.init_lora_weights,
            use_rslora=model_cfg.use_rslora,
        )
    else:
        from lora_runtime.checkpoint import apply_and_load_adapter

        apply_and_load_adapter(model, model_cfg.lora_path, expected_rank=model_cfg.lora_rank)
    mark_only_lora_trainable(model)
    return model
