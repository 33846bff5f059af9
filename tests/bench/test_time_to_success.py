"""The time-to-success benchmark (`lora-runtime bench time-to-success`) on toy sizes: each
variant's clock, the thresholds it reached and when, and the stop at the budget or the last
threshold."""

from __future__ import annotations

import json

import pytest
import yaml
from support.tiny_episodic import tiny_episodic_raw

from lora_runtime.bench import time_to_success as tts
from lora_runtime.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_episodic_raw(tmp_path / "run", tmp_path / "base")))
    return path


def test_thresholds_are_taken_from_the_greedy_evaluations_and_the_run_stops_at_the_last(config, monkeypatch):
    """Evaluations scripted to 0.5, 0.7, 0.95 (after the warm start's 0.3): 0.6 is first reached
    at the second evaluation, 0.8 and 0.9 at the third, where each variant stops."""
    script: dict[int, list[float]] = {}
    real_build = tts.build_task

    def build_task(cfg, model):
        task = real_build(cfg, model)
        def evaluate(m, n, device="cpu"):  # the base first (0.3), then each variant's model
            if id(m) not in script:
                script[id(m)] = [0.5, 0.7, 0.95] if script else [0.3]
            return {"success_rate": script[id(m)].pop(0)}

        task.evaluate = evaluate
        return task

    monkeypatch.setattr(tts, "build_task", build_task)
    report = tts.measure_level("BabyAI-GoToRedBall-v0", str(config), [], ["lora_eager", "peft_eager"], budget_s=1e9,
                               eval_every=2, eval_episodes=4, threads=1, log=lambda m: None)
    assert report["warm_start_success"] == 0.3
    for name in ("lora_eager", "peft_eager"):
        r = report["variants"][name]
        assert r["iterations"] == 6 and [e["iteration"] for e in r["evals"]] == [2, 4, 6]
        assert [e["success"] for e in r["evals"]] == [0.5, 0.7, 0.95]
        assert r["reached"]["0.6"]["iteration"] == 4 and r["reached"]["0.8"]["iteration"] == 6
        assert r["reached"]["0.9"]["iteration"] == 6
        assert 0 < r["reached"]["0.6"]["clock_s"] < r["reached"]["0.9"]["clock_s"] == r["clock_s"]
        assert r["rollout_s"] > 0 and r["env_steps_per_s"] > 0 and r["best_success"] == 0.95


def test_the_budget_stops_a_variant_and_the_cli_writes_the_json(config, tmp_path, capsys):
    out = tmp_path / "results"
    rc = cli_main(["bench", "time-to-success", "--config", str(config), "--levels", "BabyAI-GoToRedBall-v0",
                   "--variants", "lora_eager,peft_eager", "--budget-s", "0.01", "--eval-every", "1",
                   "--eval-episodes", "2", "--out-dir", str(out)])
    assert rc == 0
    report = json.loads((out / "time_to_success-BabyAI-GoToRedBall-v0.json").read_text())
    for r in report["variants"].values():  # one iteration passes a 0.01 s budget
        assert r["iterations"] == 1 and len(r["evals"]) == 1 and r["clock_s"] > 0.01
    printed = capsys.readouterr().out
    assert "lora_eager" in printed and "peft_eager" in printed and "to 0.9" in printed


def test_unknown_variants_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        tts.main(["--variants", "lora_eager,vllm"])
    assert exc.value.code == 2
    assert "--variants ['vllm'] not in ['lora_eager', 'lora_compiled', 'peft_eager']" in capsys.readouterr().err
