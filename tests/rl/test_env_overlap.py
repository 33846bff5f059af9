"""`task.overlap_envs`: the environments step in a child process, one half while the policy
acts for the other; the episodes are those of the in-process loop."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from support.models import randomize_lora
from support.tiny_episodic import tiny_episodic_raw
from support.tiny_runs import quiet

from lora_runtime.actor import prepare_actor
from lora_runtime.config import ConfigError, validate_config
from lora_runtime.rl.builtin_base import load_base
from lora_runtime.rl.outputs import read_metrics
from lora_runtime.rl.policy import ActorPolicy
from lora_runtime.rl.tasks import build_task
from lora_runtime.rl.tasks.episodes import ExpertPolicy, ModelPolicy, UniformPolicy
from lora_runtime.rl.tasks.overlapped import play_episodes, play_steps
from lora_runtime.rl.tasks.registry import task_class
from lora_runtime.rl.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")

SEEDS = [11, 12, 13, 14, 15, 16, 17]  # 7 episodes on 4 environments: a round of 4, then one of 3 (halves 2 + 1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A warm-started tiny base with a random non-zero adapter, and the same task twice:
    in-process and overlapped."""
    root = tmp_path_factory.mktemp("overlap")
    torch.set_num_threads(1)
    raw = tiny_episodic_raw(root / "run", root / "base", task={"prev_action": True, "max_episode_steps": 12})
    cfg = validate_config(raw)
    base = load_base(cfg)
    model = prepare_actor(base, cfg.actor.model)
    randomize_lora(model, std=0.3)
    model.eval()
    plain = build_task(cfg, model)
    raw["task"]["overlap_envs"] = True
    overlapped = build_task(validate_config(raw), model)
    yield root, raw, model, plain, overlapped
    overlapped._worker is not None and overlapped._worker.close()


def _episodes(task, model, greedy: bool, record: bool = True):
    policy = ActorPolicy(model, task.family, task.action_ids, 1.0)
    with torch.no_grad():  # play_episodes: in-process for `plain`, overlapped for `overlapped`
        return play_episodes(task, SEEDS, ModelPolicy(policy, torch.Generator().manual_seed(5), greedy), record=record)


@pytest.mark.parametrize("greedy", [False, True], ids=["sampled", "greedy"])
def test_overlapped_episodes_equal_the_in_process_ones(setup, greedy):
    _, _, model, plain, overlapped = setup
    want, got = _episodes(plain, model, greedy), _episodes(overlapped, model, greedy)
    assert overlapped._worker is not None and overlapped._worker.alive  # it really ran in a child
    assert plain._worker is None
    assert want.lengths.sum() > 2 * len(SEEDS)  # episodes of several steps, not all ended at once
    assert torch.equal(got.lengths, want.lengths)
    assert torch.equal(got.returns, want.returns)
    assert torch.equal(got.episode, want.episode)  # the steps in the same order
    assert torch.equal(got.actions, want.actions)
    assert torch.equal(got.obs.prompt_ids, want.obs.prompt_ids)  # previous actions in the prompts too
    assert torch.equal(got.obs.pixels, want.obs.pixels)
    torch.testing.assert_close(got.logp, want.logp, rtol=0, atol=1e-5)  # half-batch forwards round alike or nearly


def test_overlapped_ppo_steps_equal_the_in_process_ones(setup):
    """PPO's fixed-length rollout: 12 steps of 4 environments capped at 5 steps an episode,
    so episodes end (time limit, bootstrapped with a forward on the final observation) and
    their environments are reset from their own seed streams mid-rollout."""
    _, _, model, plain, overlapped = setup
    head = torch.nn.Linear(plain.family.hidden_size(model), 1)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
    runs = []
    for task in (plain, overlapped):
        task.max_episode_steps = 5
        policy = ActorPolicy(model, task.family, task.action_ids, 1.0, head)
        with torch.no_grad():
            runs.append(play_steps(task, policy, 12, torch.Generator().manual_seed(7)))
        task.max_episode_steps = 12
    want, got = runs
    assert want.ended.sum() >= 8 and (want.ended & ~want.terminated).any()  # cut episodes, several resets
    assert torch.equal(got.actions, want.actions)
    assert torch.equal(got.obs.prompt_ids, want.obs.prompt_ids)
    assert torch.equal(got.obs.pixels, want.obs.pixels)  # resets with the same seeds
    for name in ("rewards", "terminated", "ended"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.returns == want.returns and got.lengths == want.lengths
    for name in ("logp", "values", "next_values"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=1e-5)
    assert want.next_values.abs().sum() > 0  # the bootstrap values are real ones


def test_the_scripted_expert_plays_in_process(setup):
    """The expert reads the environment objects, so its episodes (the warm start's) stay in
    this process even on an overlapped task, and are the plain ones."""
    _, _, _, plain, overlapped = setup
    runs = [play_episodes(t, SEEDS[:4], ExpertPolicy(t.adapter)) for t in (plain, overlapped)]
    assert runs[1].success.sum() >= 3  # the expert solves its levels (within the 12-step cap): it saw the real environments
    assert torch.equal(runs[0].actions, runs[1].actions)
    assert torch.equal(runs[0].returns, runs[1].returns)


def test_unrecorded_random_episodes_match(setup):
    _, _, _, plain, overlapped = setup
    runs = [play_episodes(t, SEEDS, UniformPolicy(t.num_actions_per_step, torch.Generator().manual_seed(2)), record=False)
            for t in (plain, overlapped)]
    assert torch.equal(runs[0].lengths, runs[1].lengths)
    assert torch.equal(runs[0].returns, runs[1].returns)
    assert runs[1].obs is None and len(runs[1].actions) == 0


def test_the_worker_is_a_child_that_reports_errors_and_closes(setup):
    _, _, _, _, overlapped = setup
    worker = overlapped.env_worker()
    assert worker is overlapped.env_worker()  # started once
    assert worker._proc.pid != os.getpid()
    worker.reset([(0, 3)])
    worker.step_async([(0, 99)])  # no such action
    with pytest.raises(RuntimeError, match=r"task 'BabyAI-GoToRedBall-v0'.*environment failed.*99"):
        worker.step_wait()
    assert len(worker.reset([(0, 3), (1, 4)])) == 2  # still serving after the error
    os.kill(worker._proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group: the child stays
    assert len(worker.reset([(0, 3)])) == 1
    worker.close()
    worker.close()  # idempotent
    assert not worker.alive
    assert worker._proc not in multiprocessing.active_children()
    assert overlapped.env_worker() is not worker  # a closed worker is replaced on next use
    assert overlapped.env_worker().alive


PPO = {"name": "ppo", "rollout_steps": 8, "lr": 1e-2, "update_epochs": 2, "minibatches": 2}


@pytest.mark.parametrize("algorithm", [None, PPO], ids=["grpo", "ppo"])
def test_training_with_overlap_equals_training_without(setup, tmp_path, algorithm):
    root = setup[0]
    results, adapters = [], []
    for overlap in (False, True):
        out = tmp_path / f"run_{overlap}"
        raw = tiny_episodic_raw(out, root / "base16", task={"prev_action": True, "overlap_envs": overlap},
                                algorithm=algorithm)
        train(validate_config(raw), log=quiet)
        results.append(read_metrics(str(out / "metrics.jsonl")))
        adapters.append(load_file(str(out / "adapter" / "adapter_model.safetensors")))
    keys = ("reward_mean", "success_rate", "env_steps") if algorithm else ("reward_mean", "success_rate", "env_steps",
                                                                           "trained_rows")
    assert [[r[k] for k in keys] for r in results[0]] == [[r[k] for k in keys] for r in results[1]]
    if algorithm is None:
        assert all(r["success_rate"] > 0 and r["trained_rows"] > 0 for r in results[0])  # the updates had a signal
    for a, b in zip(results[0], results[1], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    assert adapters[0].keys() == adapters[1].keys()
    # The rollouts' log-probs (and PPO's values) come from half-batch forwards, which can round
    # differently at ~1e-7; AdamW's normalised step can turn that into ~1e-4 on a weight whose
    # gradient is near zero. The episodes themselves (rewards, steps) are equal above.
    for name, weight in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], weight, rtol=0, atol=1e-3)


def test_refused_with_compile_names_the_keys_and_leaves_nothing(setup, tmp_path):
    raw = setup[1]
    run = {**raw, "task": {**raw["task"], "overlap_envs": True},
           "runner": {**raw["runner"], "output_dir": str(tmp_path / "refused"), "compile": True}}
    with pytest.raises(ConfigError, match=r"task.overlap_envs=true cannot be used with runner.compile=true"):
        train(validate_config(run), log=quiet)
    assert not (tmp_path / "refused").exists()


def test_refused_under_torchrun(setup):
    raw = setup[1]
    run = {**raw, "task": {**raw["task"], "overlap_envs": True}, "runner": {**raw["runner"], "distributed": "ddp"},
           "algorithm": {"name": "ppo", "rollout_steps": 4}}
    cfg = validate_config(run)
    with pytest.raises(ConfigError, match=r"task.overlap_envs=true is not supported with runner.distributed='ddp'"):
        task_class("babyai").check(cfg)
    task_class("babyai").check(validate_config({**run, "task": {**raw["task"], "overlap_envs": False}}))  # accepted


def test_ctrl_c_to_the_process_group_saves_and_leaves_no_process(setup, tmp_path):
    """A terminal's Ctrl-C reaches the run and its environment worker alike: the run finishes
    its step and saves, and no process of the group is left. (The signal lands in whatever
    phase the run is in; that the worker survives it mid-rollout is pinned by sending it
    SIGINT directly in `test_the_worker_is_a_child_that_reports_errors_and_closes`.)"""
    root = setup[0]
    raw = tiny_episodic_raw(tmp_path / "out", root / "base16", task={"prev_action": True, "overlap_envs": True},
                            steps=100000, progress=True)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen([sys.executable, "-m", "lora_runtime", "train", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            start_new_session=True)  # its own process group, as a terminal's job
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # the run and its worker
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "Traceback" not in err and f"stopped by SIGINT after step {summary['last_step']}: saved adapter/" in err
    assert summary["interrupted"] and summary["steps_run"] >= 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)  # anything left in the group?
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("a process of the run's group (the environment worker) outlived it")
