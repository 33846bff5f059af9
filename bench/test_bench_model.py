"""Model level: train steps (forward, backward, AdamW) and rollout forwards of the tiny
Llama and the built-in actor, for every variant of `lora_runtime.bench.model`, and the
peak memory of each train-step variant measured in its own process."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from lora_runtime.bench.model import (
    COMPILED,
    ROLLOUT_VARIANTS,
    TRAIN_VARIANTS,
    model_flop_limits,
    warm_compiled,
)
from lora_runtime.bench.timing import synced

MODELS = ["tiny-llama", "actor"]


@pytest.mark.parametrize("variant", TRAIN_VARIANTS)
@pytest.mark.parametrize("model", MODELS)
def test_train_step(benchmark, model_benches, device, model, variant):
    bench = model_benches(model)
    step = bench.train_step(variant)
    if variant in COMPILED:
        benchmark.extra_info["compile_warmup_s"] = warm_compiled({variant: step})[variant]
    benchmark.group = f"train step {model}"
    benchmark.extra_info["flop_limit"] = model_flop_limits(bench.lora_model())["train"]
    benchmark.pedantic(synced(step, device), rounds=5, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("variant", ROLLOUT_VARIANTS)
@pytest.mark.parametrize("model", MODELS)
def test_rollout(benchmark, model_benches, device, model, variant):
    bench = model_benches(model)
    with ExitStack() as stack:
        forward = bench.rollout(variant, stack)
        benchmark.group = f"rollout {model}"
        benchmark.pedantic(synced(forward, device), rounds=10, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("variant", TRAIN_VARIANTS)
@pytest.mark.parametrize("model", MODELS)
def test_peak_memory(benchmark, device, model, variant):
    """Times the child process (not meaningful) and records its memory in extra_info."""
    from lora_runtime.bench.memory import run_memory

    benchmark.group = f"peak memory {model} (child process time; figures in extra_info)"
    result = benchmark.pedantic(
        lambda: run_memory([(model, variant)], str(device), log=lambda _: None)[model][variant],
        rounds=1, iterations=1,
    )
    assert "error" not in result, result.get("error")
    benchmark.extra_info.update(result)
