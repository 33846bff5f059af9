"""`runner.rollout_weights`: rollouts on the live adapters or inside `merged()`, chosen by
measurement with `auto`, refused where it cannot apply."""

from __future__ import annotations

import json

import pytest
import torch
from support.tiny_episodic import tiny_episodic_raw
from support.tiny_runs import quiet

import lora_runtime.rl.rollout_weights as rw
from lora_runtime.adapters import apply_lora
from lora_runtime.config import ConfigError, validate_config
from lora_runtime.rl.trainer import train


def _raw(out, base, rollout_weights: str, **keys) -> dict:
    raw = tiny_episodic_raw(out, base, **keys)
    raw["runner"]["rollout_weights"] = rollout_weights
    return raw


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _gemm_rows_independent_of_batch() -> bool:
    """True when this machine's float32 GEMM gives each row the same bits at every batch size
    from 1 to 64 rows (MKL on the Intel hosts; on an AMD EPYC host 1-3 rows take another
    kernel, so a rollout's last few live rows round differently from the update's batch)."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)
    full = torch.nn.functional.linear(x, w)
    return all(torch.equal(torch.nn.functional.linear(x[:m], w), full[:m]) for m in range(1, 65))


def test_merged_rollouts_train_from_restored_weights_and_report_the_gap(tmp_path):
    """The same run with merged and with unmerged rollouts: the same episodes, log-prob gaps
    of float rounding with merged, 0 without where the machine's GEMM rounds a row alike at
    every batch size (else rounding only), and the same trained adapter to float tolerance
    (merged() restores the base weights bit for bit before each update)."""
    from safetensors.torch import load_file

    runs = {}
    for how in ("unmerged", "merged"):
        raw = _raw(tmp_path / how, tmp_path / "base", how, steps=3)
        train(validate_config(raw), log=quiet)
        runs[how] = _metrics(tmp_path / how)
    unmerged_bound = 0.0 if _gemm_rows_independent_of_batch() else 1e-5
    for a, b in zip(runs["unmerged"], runs["merged"]):
        assert (a["rollout_merged"], b["rollout_merged"]) == (0.0, 1.0)
        assert a["env_steps"] == b["env_steps"] and a["reward_mean"] == b["reward_mean"]
        assert 0.0 <= a["rollout_logp_gap"] <= unmerged_bound
        assert 0.0 <= b["rollout_logp_gap"] < 1e-5
        assert a["rollout_forwards"] == b["rollout_forwards"] > 0
    assert any(b["rollout_logp_gap"] > 0 for b in runs["merged"])  # merged weights round differently
    ours, theirs = (load_file(str(tmp_path / h / "adapter" / "adapter_model.safetensors")) for h in ("unmerged", "merged"))
    for key in ours:
        assert (ours[key] - theirs[key]).abs().max() < 1e-4, key


@pytest.mark.parametrize(("t_merged", "t_enter_leave", "choice"), [(0.5, 2.0, "merged"), (0.99, 0.1, "unmerged"),
                                                                    (0.5, 60.0, "unmerged")])
def test_auto_keeps_merged_only_when_the_rollout_is_cheaper(monkeypatch, t_merged, t_enter_leave, choice):
    """Timings 1.0 (unmerged forward), `t_merged`, `t_enter_leave` and 64 forwards: merged
    when 3 % cheaper over the rollout, enter and leave included."""
    model = apply_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), rank=2, target_modules=["0"])
    figures = iter([1.0, t_enter_leave, t_merged])
    monkeypatch.setattr(rw, "_median_time", lambda fn: next(figures))
    lines = []
    weights = rw.RolloutWeights(model, "auto", None, lines.append)
    assert weights.choice is None
    weights.decide(lambda: None, 64)
    assert weights.choice == choice and weights.merged == (choice == "merged")
    assert lines == [(f"rollouts: {choice} weights (measured: forward 1000.00 ms unmerged, {1e3 * t_merged:.2f} ms merged; "
                     f"merged() enter + leave {1e3 * t_enter_leave:.2f} ms; 64 forwards per rollout: 64000.0 ms vs "
                      f"{1e3 * (t_enter_leave + 64 * t_merged):.1f} ms)")]
    weights.decide(lambda: None, 64)  # once only
    assert len(lines) == 1


def test_auto_in_full_mode_stays_unmerged_and_says_why():
    lines = []
    weights = rw.RolloutWeights(None, "auto", "full mode: no adapters to merge", lines.append)
    assert weights.choice == "unmerged" and lines == ["rollouts: unmerged weights (full mode: no adapters to merge)"]


@pytest.mark.parametrize(("keys", "why"), [({"mode": "full"}, "full mode: no adapters to merge"),
                                           ({"compile": True}, "a compiled actor would be traced again")])
def test_merged_is_refused_where_it_cannot_apply(tmp_path, keys, why):
    raw = _raw(tmp_path / "run", tmp_path / "base", "merged", **keys)
    with pytest.raises(ConfigError, match=rf"runner.rollout_weights='merged' cannot apply here \({why}.*use 'auto' or 'unmerged'"):
        train(validate_config(raw), log=quiet)
    assert not (tmp_path / "run").exists() and not (tmp_path / "base").exists()
