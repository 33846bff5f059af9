"""Model-level benchmark: train steps and rollout forwards of one model, every variant built
from the same base weights and the same non-zero adapter weights.

Train-step variants (forward, backward, AdamW step; `TRAIN_VARIANTS`):

- `base`: the frozen base model, no adapters, no parameter requires grad; the input
  requires grad, so the backward runs through every layer (forward + input gradients).
  There is nothing for an optimizer to step, so none is called.
- `base_compiled`: the same, under `torch.compile`.
- `lora_eager` / `lora_compiled`: this runtime (`apply_lora`, r = alpha = the spec's rank,
  32 for the benchmark models, on the default targets present in the model, siblings
  grouped as `prepare_actor` does); compiled with `lora_runtime.compile.compile_actor`.
- `lora_ungrouped`: `lora_eager` with `group_siblings` off (the ablation).
- `peft_eager` / `peft_compiled`: HF PEFT (`get_peft_model`, same r, alpha, targets,
  dropout 0); compiled with `torch.compile`.
- `full`: full fine-tune, every parameter trains.

Rollout variants (one forward under `torch.no_grad()`; `ROLLOUT_VARIANTS`): `base`,
`lora_unmerged`, `lora_merged` (inside `merged(model)`, entered once before timing),
`peft_unmerged`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from contextlib import ExitStack

import torch
from torch import nn

from lora_runtime.adapters import (
    apply_lora,
    find_targets,
    group_siblings,
    iter_lora_layers,
    mark_only_lora_trainable,
    merged,
)
from lora_runtime.bench.op import flop_limits
from lora_runtime.bench.specs import ModelSpec, present_targets
from lora_runtime.bench.timing import Timing, Variant, measure_interleaved
from lora_runtime.compile import compile_actor

__all__ = [
    "ROLLOUT_VARIANTS",
    "TRAIN_VARIANTS",
    "ModelBench",
    "model_flop_limits",
]

LR = 1e-5  # small: hundreds of steps must not drift the weights into NaN
TRAIN_VARIANTS = ("base", "base_compiled", "lora_eager", "lora_ungrouped", "lora_compiled",
                  "peft_eager", "peft_compiled", "full")
ROLLOUT_VARIANTS = ("base", "lora_unmerged", "lora_merged", "peft_unmerged")
COMPILED = ("base_compiled", "lora_compiled", "peft_compiled")


def model_flop_limits(model: nn.Module) -> dict:
    """FLOP-limit ratios of a patched model, from its LoRA layers: the base GEMMs cost
    `in*out` per token, the adapter `r(in+out)` (forward) and 1.5x that in training.
    Attention scores, norms and the loss are left out: they only lower the real ratio."""
    base = lora = 0
    for _, layer in iter_lora_layers(model):
        base += layer.in_features * layer.out_features
        lora += layer.r * (layer.in_features + layer.out_features)
    if base == 0:
        raise ValueError("model_flop_limits: the model has no LoRA layers")
    forward, train = flop_limits(base, lora)
    return {"forward": forward, "train": train,
            "patched_layers": sum(1 for _ in iter_lora_layers(model)),
            "base_macs_per_token": base, "lora_macs_per_token": lora}


def _compile_lora(model: nn.Module) -> tuple[nn.Module, str]:
    return compile_actor(model), "lora_runtime.compile.compile_actor"


class ModelBench:
    """Builds the variants of one model on one device.

    Args:
        spec: the model.
        device: where everything runs.
        seed: seeds the batch and the adapter weights.
    """

    def __init__(self, spec: ModelSpec, device: torch.device | str = "cpu", seed: int = 0) -> None:
        self.spec = spec
        self.device = torch.device(device)
        gen = torch.Generator().manual_seed(seed)
        self.rank = spec.rank
        self.base = spec.build().to(self.device)
        self.targets = present_targets(self.base)
        self.batch = spec.batch(self.device, gen)
        self._adapter = self._draw_adapter(gen)
        self.notes: dict[str, str] = {}

    def _draw_adapter(self, gen: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Non-zero A and B per target path, shared by every LoRA and PEFT variant."""
        weights = {}
        for path, linear in find_targets(self.base, self.targets):
            a = torch.randn(self.rank, linear.in_features, generator=gen) / self.rank  # [r, in]
            b = torch.randn(linear.out_features, self.rank, generator=gen) * 0.02  # [out, r]
            weights[path] = (a.to(self.device), b.to(self.device))
        return weights

    def _base_copy(self, fresh: bool) -> nn.Module:
        return copy.deepcopy(self.base) if fresh else self.base

    @torch.no_grad()
    def lora_model(self, fresh: bool = True, grouped: bool = True) -> nn.Module:
        """A copy of the base (or the base itself) patched by this runtime, siblings grouped
        (from one forward of the batch) unless `grouped` is False."""
        model = apply_lora(self._base_copy(fresh), self.rank, float(self.rank),
                           target_modules=self.targets)
        for path, layer in iter_lora_layers(model):
            a, b = self._adapter[path]
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
        mark_only_lora_trainable(model)
        if grouped:
            group_siblings(model, run=lambda m: self.spec.rollout(m, self.batch))
        return model

    @torch.no_grad()
    def peft_model(self, fresh: bool = True) -> nn.Module:
        """A copy of the base (or the base itself) wrapped by HF PEFT, same adapter weights."""
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=self.rank, lora_alpha=self.rank, target_modules=list(self.targets),
                            lora_dropout=0.0, init_lora_weights="gaussian")
        model = get_peft_model(self._base_copy(fresh), config)
        inner = model.base_model.model
        for path, (a, b) in self._adapter.items():
            layer = inner.get_submodule(path)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
        return model

    def train_step(self, variant: str, fresh: bool = True) -> Callable[[], torch.Tensor]:
        """One train step of `variant` (see `TRAIN_VARIANTS`) as a function of no argument.

        Raises:
            ValueError: an unknown variant.
        """
        spec, batch = self.spec, self.batch
        loss_fn = spec.loss
        if variant in ("base", "base_compiled"):
            model = self._base_copy(fresh).requires_grad_(False)
            loss_fn = spec.loss_input_grad
        elif variant in ("lora_eager", "lora_compiled", "lora_ungrouped"):
            model = self.lora_model(fresh, grouped=variant != "lora_ungrouped")
        elif variant in ("peft_eager", "peft_compiled"):
            model = self.peft_model(fresh)
        elif variant == "full":
            model = self._base_copy(fresh).requires_grad_(True)
        else:
            raise ValueError(f"bench: unknown train variant {variant!r}; allowed: {TRAIN_VARIANTS}")
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR) if params and not variant.startswith("base") else None
        if variant == "base_compiled":
            model, self.notes["base_compiled"] = torch.compile(model), "torch.compile"
        elif variant == "lora_compiled":
            model, self.notes["lora_compiled"] = _compile_lora(model)
        elif variant == "peft_compiled":
            model, self.notes["peft_compiled"] = torch.compile(model), "torch.compile"

        def step() -> torch.Tensor:
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            if opt is not None:
                opt.step()
            return loss.detach()

        step.model = model  # type: ignore[attr-defined]  (for the FLOP limits and the tests)
        return step

    def rollout(self, variant: str, stack: ExitStack) -> Callable[[], torch.Tensor]:
        """One no-grad forward of `variant` (see `ROLLOUT_VARIANTS`); `stack` holds the
        `merged(...)` context of `lora_merged` open until it is closed.

        Raises:
            ValueError: an unknown variant.
        """
        if variant == "base":
            model = self.base
        elif variant == "lora_unmerged":
            model = self.lora_model()
        elif variant == "lora_merged":
            model = self.lora_model()
            stack.enter_context(merged(model))
        elif variant == "peft_unmerged":
            model = self.peft_model()
        else:
            raise ValueError(f"bench: unknown rollout variant {variant!r}; allowed: {ROLLOUT_VARIANTS}")
        model.eval()
        spec, batch = self.spec, self.batch

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return spec.rollout(model, batch)

        return forward

    def merge_cost(self, repeats: int = 3, clock: str = "wall") -> dict:
        """Seconds to enter and leave `merged(model)` once (what a rollout phase pays)."""
        model = self.lora_model()

        def enter_exit() -> None:
            with merged(model):
                pass

        t = measure_interleaved([Variant("merge_enter_exit", enter_exit)], device=self.device,
                                min_repeats=repeats, max_repeats=repeats, clock=clock)
        return t["merge_enter_exit"].to_json()


def warm_compiled(steps: dict[str, Callable[[], object]], calls: int = 2) -> dict[str, list[float]]:
    """Runs each compiled variant `calls` times (compilation happens here, not in timing)."""
    seconds: dict[str, list[float]] = {}
    for name, fn in steps.items():
        if name in COMPILED:
            seconds[name] = []
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - start)
    return seconds


def time_train(bench: ModelBench, variants, **timing) -> tuple[dict[str, Timing], dict]:
    """Builds and times the train-step variants side by side; returns (timings, extras).

    `timing` goes to `measure_interleaved` (budget_s, min_repeats, max_repeats, clock)."""
    steps = {v: bench.train_step(v) for v in variants}
    compile_s = warm_compiled(steps)
    lora = next((s.model for v, s in steps.items() if v.startswith("lora")), None)
    limits = model_flop_limits(lora if lora is not None else bench.lora_model())
    timings = measure_interleaved([Variant(v, s) for v, s in steps.items()],
                                  device=bench.device, warmup=2, **timing)
    return timings, {"compile_warmup_s": compile_s, "flop_limit": limits}


def time_rollout(bench: ModelBench, variants, **timing) -> dict[str, Timing]:
    """Builds and times the rollout variants side by side (`timing` as in `time_train`).

    An error raised when `merged(...)` is left (its exact restore failed) does not discard
    the timings; it is recorded in `bench.notes["lora_merged"]`."""
    stack = ExitStack()
    try:
        fns = {v: bench.rollout(v, stack) for v in variants}
        timings = measure_interleaved([Variant(v, f) for v, f in fns.items()],
                                      device=bench.device, warmup=2, **timing)
    except BaseException:
        stack.close()
        raise
    try:
        stack.close()
    except Exception as exc:  # noqa: BLE001  (reported beside the figures)
        bench.notes["lora_merged"] = f"leaving merged(...) raised {type(exc).__name__}: {exc}"
    return timings
