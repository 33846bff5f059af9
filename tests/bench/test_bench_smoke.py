"""Smoke test of the benchmark harness: one toy case end to end, plus the pieces it rests on
(interleaving, FLOP limits, identical weights across runtimes). No timing is asserted."""

from __future__ import annotations

import json
import math
from contextlib import ExitStack

import pytest
import torch

from lora_runtime.adapters import iter_lora_layers
from lora_runtime.bench import main as bench
from lora_runtime.bench.model import ModelBench, model_flop_limits
from lora_runtime.bench.op import OpGroup, forward_flop_limit, op_variants, train_flop_limit
from lora_runtime.bench.report import check_targets
from lora_runtime.bench.specs import get_spec
from lora_runtime.bench.timing import Variant, measure_interleaved

OP_ROW_KEYS = {
    "dtype", "tokens", "in", "out", "r", "median_s", "fwd_lora_over_base", "fwd_peft_over_base",
    "fwd_lora_over_peft", "fwd_flop_limit", "train_lora_over_base", "train_peft_over_base",
    "train_lora_over_peft", "train_flop_limit",
}


def test_smoke_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--profile", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())

    machine = result["machine"]
    assert machine["torch_num_threads"] >= 1 and len(machine["loadavg"]) == 3
    assert machine["device"] == "cpu" and machine["torch"] == torch.__version__

    (row,) = result["op"]["rows"]  # --smoke: N=16, 64x64, r=8, float32
    assert set(row) == OP_ROW_KEYS
    assert (row["tokens"], row["in"], row["out"], row["r"]) == (16, 64, 64, 8)
    assert row["fwd_flop_limit"] == pytest.approx(1 + 8 * 128 / 64**2)
    assert row["train_flop_limit"] == pytest.approx(1 + 1.5 * 8 * 128 / 64**2)
    assert row["train_lora_over_base"] == pytest.approx(
        row["median_s"]["lora_train"] / row["median_s"]["base_train"])
    raw = result["op"]["raw"]["float32/N16/64x64"]
    assert set(raw) == {"base_fwd", "base_train", "lora_fwd[r=8]", "peft_fwd[r=8]",
                        "lora_train[r=8]", "peft_train[r=8]"}
    for figures in raw.values():  # every variant sampled the same number of times
        assert len(figures["samples_s"]) == figures["repeats"] == raw["base_fwd"]["repeats"]
        assert figures["median_s"] > 0 and figures["warmup_s"]

    model = result["models"]["tiny-llama-smoke"]
    assert list(model["train"]) == ["base", "lora_eager", "peft_eager", "full"]
    assert list(model["rollout"]) == ["base", "lora_unmerged", "lora_merged", "peft_unmerged"]
    assert model["flop_limit"]["patched_layers"] == 8  # q k v o gate up down + lm_head
    memory = model["memory"]["lora_eager"]
    assert "error" not in memory, memory
    assert memory["peak_mb"] >= memory["baseline_mb"] > 0
    assert memory["peak_over_baseline_mb"] == pytest.approx(memory["peak_mb"] - memory["baseline_mb"])
    assert {t["target"] for t in model["targets"]} >= {"train: lora_eager / peft_eager",
                                                       "memory: lora_eager / full",
                                                       "decode b8: lora_unmerged / base",
                                                       "merged(): enter+leave / one forward"}
    assert list(model["decode"]) == ["8"]  # --smoke: batch 8 only
    assert list(model["decode"]["8"]) == ["base", "lora_unmerged", "lora_merged", "peft_unmerged"]
    assert list(result["layer_calls"]) == ["1", "8", "16"]
    assert {t["target"] for t in result["global_targets"]} >= {"layer call N=8: lora / nn.Linear"}

    profile = model["profile"]
    assert list(profile) == ["base", "lora_eager", "peft_eager", "full"]
    assert profile["base"]["rank-r GEMMs"] == 0 < profile["lora_eager"]["rank-r GEMMs"]
    assert profile["lora_eager"]["optimizer"] > 0 == profile["base"]["optimizer"]
    for split in profile.values():
        assert split["total"] == pytest.approx(sum(v for k, v in split.items() if k != "total"))

    decode = model["profile_decode"]  # generate b8: ms per call by category, wall total
    assert list(decode) == ["base", "lora_unmerged", "peft_unmerged"]
    assert decode["base"]["rank-r GEMMs"] == 0 < decode["lora_unmerged"]["rank-r GEMMs"]
    assert decode["base"]["LoRA op glue"] == 0 == decode["peft_unmerged"]["LoRA op glue"]
    for split in decode.values():  # the wall time = time in ops + outside ops (finite, not clamped)
        in_ops = sum(v for k, v in split.items() if k not in ("total", "outside ops"))
        assert "optimizer" not in split and math.isfinite(split["outside ops"])
        assert in_ops + split["outside ops"] == pytest.approx(split["total"])

    for text in ("forward (no grad)", "profile tiny-llama-smoke decode b8 (ms/generate)", "lora/base", "model tiny-llama-smoke", "train step",
                 "rollout forward", "targets (tiny-llama-smoke)", str(out)):
        assert text in printed


def test_interleaving_rotates_and_excludes_warmup():
    calls: list[str] = []
    variants = [Variant(name, lambda name=name: calls.append(name)) for name in "abc"]
    timings = measure_interleaved(variants, warmup=2, repeats=3, min_sample_s=0.0)
    assert calls == list("abcabc") + list("abc") + list("bca") + list("cab")
    for t in timings.values():
        assert t.number == 1 and len(t.warmup_s) == 2 and len(t.samples_s) == 3


def test_measure_rejects_bad_input():
    with pytest.raises(ValueError, match="distinct"):
        measure_interleaved([Variant("a", lambda: None), Variant("a", lambda: None)])
    with pytest.raises(ValueError, match="clock='gpu'"):
        measure_interleaved([Variant("a", lambda: None)], clock="gpu")


def test_flop_limits():
    assert forward_flop_limit(32, 1024, 1024) == pytest.approx(1 + 32 * 2048 / 1024**2)
    assert train_flop_limit(64, 2048, 5504) == pytest.approx(1 + 1.5 * 64 * 7552 / (2048 * 5504))
    mb = ModelBench(get_spec("tiny-llama-smoke"))
    model = mb.lora_model()
    layers = [layer for _, layer in iter_lora_layers(model)]
    base = sum(la.in_features * la.out_features for la in layers)
    lora = sum(4 * (la.in_features + la.out_features) for la in layers)  # smoke rank 4
    limits = model_flop_limits(model)
    assert limits["forward"] == pytest.approx(1 + lora / base)
    assert limits["train"] == pytest.approx(1 + 1.5 * lora / base)


def test_variants_compute_the_same_model():
    """Both runtimes get identical non-zero adapters: same loss, different from the base."""
    mb = ModelBench(get_spec("tiny-llama-smoke"))
    with torch.no_grad():
        losses = {v: mb.spec.loss(m, mb.batch).item() for v, m in
                  (("base", mb.base), ("lora", mb.lora_model()), ("peft", mb.peft_model()))}
    assert losses["lora"] == pytest.approx(losses["peft"], rel=1e-5)
    assert abs(losses["lora"] - losses["base"]) > 1e-6
    with ExitStack() as stack:
        outs = {v: mb.rollout(v, stack)() for v in ("lora_unmerged", "lora_merged", "peft_unmerged")}
    torch.testing.assert_close(outs["lora_merged"], outs["lora_unmerged"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs["peft_unmerged"], outs["lora_unmerged"], rtol=1e-4, atol=1e-5)


def test_op_variants_agree():
    group = OpGroup(tokens=3, in_features=16, out_features=24, dtype="float32", ranks=(4,))
    fns = {v.name: v.fn for v in op_variants(group)}
    torch.testing.assert_close(fns["lora_fwd[r=4]"](), fns["peft_fwd[r=4]"](), rtol=1e-5, atol=1e-5)
    for lora_grad, peft_grad in zip(fns["lora_train[r=4]"](), fns["peft_train[r=4]"]()):
        torch.testing.assert_close(lora_grad, peft_grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dtype 'int8'"):
        op_variants(OpGroup(3, 16, 24, "int8", (4,)))


def test_targets_need_figures():
    checks = {t["target"]: t for t in check_targets({"train": {}, "rollout": {}, "memory": {}})}
    assert all(t["met"] is None for t in checks.values())
    result = {"flop_limit": {"train": 1.1, "forward": 1.05},
              "train": {"lora_eager": {"median_s": 1.0}, "peft_eager": {"median_s": 1.2},
                        "base": {"median_s": 0.8}}}
    checks = {t["target"]: t for t in check_targets(result)}
    assert checks["train: lora_eager / peft_eager"]["met"] is True  # 0.833 <= 0.90
    assert checks["train: lora_eager / base"]["met"] is False  # 1.25 > 1.15


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shapes", "64x"], "--shapes item '64x'"),
        (["--tokens", "0"], "--tokens='0'"),
        (["--models", "gpt9"], "--models: unknown name 'gpt9'"),
        (["--dtypes", "int8"], "dtype 'int8'"),
        (["--device", "tpu"], "--device='tpu': expected cpu, cuda, cuda:N or auto"),
        (["--train-variants", "lora_fast"], "--train-variants: unknown name 'lora_fast'"),
        (["--min-repeats", "9", "--max-repeats", "3"], "--min-repeats <= --max-repeats"),
        (["--memory-parallel", "0"], "--memory-parallel 0"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, argv, message):
    out = tmp_path / "never.json"
    with pytest.raises(SystemExit, match=message):
        bench.main(["--smoke", "--skip-memory", "--json", str(out), *argv])
    assert not out.exists()
