"""Two-iteration trains of each mode on a BabyAI level (toy sizes): outputs, metrics, the
warm start, exact continuation, and `lora-runtime eval` on the results."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from support.models import step_logits as episode_logits
from support.tiny_episodic import tiny_episodic_raw
from support.tiny_runs import quiet

from lora_runtime.adapters import adapter_disabled
from lora_runtime.adapters.peft_format import ADAPTER_WEIGHTS_NAME
from lora_runtime.cli import main
from lora_runtime.config import validate_config
from lora_runtime.rl.actor_builder import build_actor
from lora_runtime.rl.builtin_base import builtin_base_dir
from lora_runtime.rl.outputs import curves_figure, read_metrics
from lora_runtime.rl.tasks import build_task as make_task
from lora_runtime.rl.tasks.episodes import HELD_OUT_SEED
from lora_runtime.rl.tasks.episodes import quiet as task_quiet
from lora_runtime.rl.trainer import train

EPISODE_KEYS = {"success_rate", "reward_mean", "episode_len", "rollout_s", "train_s", "env_steps_per_s", "loss",
                "pg_loss", "kl", "entropy", "clip_frac", "grad_norm", "step", "chance_reward", "lr", "step_time_s"}

pytestmark = pytest.mark.usefixtures("one_thread")


def run(raw):
    torch.manual_seed(0)  # the trainer draws a new adapter's lora_A before it seeds (issue 13 moves that)
    return train(validate_config(raw), log=quiet)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("episodic")
    torch.set_num_threads(1)
    base = root / "base"
    new = run(tiny_episodic_raw(root / "lora_new", base, plot=True))
    resume = run(tiny_episodic_raw(root / "lora_resume", base, lora_path=root / "lora_new" / "adapter"))
    full = run(tiny_episodic_raw(root / "full", base, mode="full", lr=3e-3))
    return root, new, resume, full


def test_warm_start_is_behaviour_cloned_and_recorded(runs):
    root, *_ = runs
    folder = builtin_base_dir(validate_config(tiny_episodic_raw(root / "x", root / "base")))
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        report = json.load(f)["pretrain"]
    assert report["demo_episodes"] == 4 and report["expert_success"] == 1.0 and report["steps"] == 5
    assert 0.0 <= report["warm_start_success"] <= 1.0 and report["eval_episodes"] == 4
    assert 0.0 <= report["random_success"] <= 1.0


def test_each_mode_trains_two_iterations_and_writes_its_run(runs):
    root, new, resume, full = runs
    for result, weights in ((new, "adapter"), (resume, "adapter"), (full, "model")):
        out = result.output_dir
        assert {weights, "train_state", "metrics.jsonl", "summary.json", "config.yaml"} <= set(os.listdir(out))
        records = read_metrics(os.path.join(out, "metrics.jsonl"))
        assert len(records) == 2 and EPISODE_KEYS <= set(records[0])
        for r in records:
            assert 0.0 <= r["success_rate"] <= 1.0 and 1 <= r["episode_len"] <= 16
            assert r["env_steps_per_s"] > 0 and r["rollout_s"] > 0
        s = result.summary
        assert {"first_success", "final_success", "env_steps_per_s"} <= set(s)
    assert os.path.isfile(os.path.join(root, "lora_new", "curves.png"))
    assert [r["step"] for r in read_metrics(os.path.join(resume.output_dir, "metrics.jsonl"))] == [3, 4]
    assert os.path.isfile(os.path.join(new.output_dir, "adapter", ADAPTER_WEIGHTS_NAME))
    lora_b = [t for k, t in load_file(os.path.join(new.output_dir, "adapter", ADAPTER_WEIGHTS_NAME)).items() if "lora_B" in k]
    assert lora_b and any(t.abs().max() > 0 for t in lora_b)  # the two updates moved the adapter


def test_new_then_resume_equals_one_longer_run(runs, tmp_path):
    root, _new, resume, _ = runs
    longer = run(tiny_episodic_raw(tmp_path / "long", root / "base", steps=4))
    a = load_file(os.path.join(resume.output_dir, "adapter", ADAPTER_WEIGHTS_NAME))
    b = load_file(os.path.join(longer.output_dir, "adapter", ADAPTER_WEIGHTS_NAME))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    la = read_metrics(os.path.join(resume.output_dir, "metrics.jsonl"))
    lb = read_metrics(os.path.join(longer.output_dir, "metrics.jsonl"))[2:]
    assert [r["reward_mean"] for r in la] == pytest.approx([r["reward_mean"] for r in lb], abs=1e-6)


def test_resume_starts_from_the_new_runs_final_policy(runs):
    """A resume actor, before its first update, acts exactly as the new run's final actor (its
    saved adapter is loaded, not a fresh one), and that policy differs from the base's."""
    root, new, *_ = runs
    cfg = validate_config(tiny_episodic_raw(root / "unused", root / "base", lora_path=root / "lora_new" / "adapter"))
    resumed = build_actor(cfg, log=quiet).eval()
    task = make_task(cfg, resumed)
    with task_quiet():
        observations, _ = task.env.reset(seed=[HELD_OUT_SEED + i for i in range(task.num_envs)])
    obs = task.encode(task.split(observations))
    with torch.no_grad():
        got = episode_logits(resumed, obs)  # [N, V]
        want = episode_logits(new.model.eval(), obs)
        with adapter_disabled(resumed):
            base = episode_logits(resumed, obs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - base).abs().max() > 1e-4  # the trained adapter changes the policy
    assert not os.path.exists(root / "unused")


def test_eval_command_adapter_merged_and_base(runs, tmp_path, capsys):
    import yaml

    root, new, *_ = runs
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_episodic_raw(tmp_path / "unused", root / "base")))
    adapter = os.path.join(new.output_dir, "adapter")
    assert main(["eval", str(cfg), "--episodes", "4", "--adapter", adapter]) == 0
    unmerged = capsys.readouterr().out
    assert main(["eval", str(cfg), "--episodes", "4", "--adapter", adapter, "--merged"]) == 0
    merged = capsys.readouterr().out
    assert "1073741824..1073741827" in unmerged  # held-out seeds
    row = next(line for line in unmerged.splitlines() if "adapter" in line)
    mrow = next(line for line in merged.splitlines() if "adapter" in line)
    assert row.split("│")[2:] == mrow.split("│")[2:]  # same success, return and length merged or not
    assert main(["eval", str(cfg), "--episodes", "0"]) == 2
    assert "eval --episodes 0: must be at least 1" in capsys.readouterr().err
    assert main(["eval", str(cfg), "--merged"]) == 2
    assert "eval --merged needs an adapter" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "unused")


def test_the_demo_table_has_the_random_policy_and_goes_to_eval_json(runs, tmp_path, capsys):
    import json
    from types import SimpleNamespace

    import yaml

    from lora_runtime.cli.evaluate import evaluate_demo

    root, new, _, full = runs
    demo_runs = []
    for name, result, raw in (("lora_new", new, tiny_episodic_raw(root / "lora_new", root / "base")),
                              ("full", full, tiny_episodic_raw(root / "full", root / "base", mode="full"))):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        demo_runs.append(SimpleNamespace(name=name, config=str(path), overrides=[], output_dir=result.output_dir))
    evaluate_demo(demo_runs)
    out = capsys.readouterr().out
    saved = json.loads((root / "eval.json").read_text())
    assert [r["model"] for r in saved["rows"]] == ["random policy", "warm start (base)", "lora_new (adapter)",
                                                    "full (model/)"]
    assert all(r["episodes"] == 4 and r["first_seed"] == HELD_OUT_SEED for r in saved["rows"])
    assert "random policy" in out and "target for lora_new: success >= 0.85" in out and str(root / "eval.json") in out


def test_eval_of_a_full_runs_model_names_that_model(runs, tmp_path, capsys):
    import yaml

    root, *_, full = runs
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_episodic_raw(tmp_path / "unused", root / "base", mode="full")))
    model = os.path.join(full.output_dir, "model")
    assert main(["eval", str(cfg), "--episodes", "2", "--set", f"actor.model.model_path={model}"]) == 0
    out = capsys.readouterr().out
    assert f"model {model}" in out and " base " not in out


def test_curves_show_success_apart_from_reward_and_legends_hide_no_curve(runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, new, *_ = runs
    records = read_metrics(os.path.join(new.output_dir, "metrics.jsonl"))
    fig = curves_figure(records, "t")
    try:
        fig.canvas.draw()
        reward, success = fig.axes[0], fig.axes[1]
        labels = [line.get_label() for line in reward.get_lines()]
        assert labels[0] == "reward (mean of batch)" and "success rate" not in labels
        assert "success rate" in [line.get_label() for line in success.get_lines()]
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is not None:
                assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    finally:
        plt.close(fig)
