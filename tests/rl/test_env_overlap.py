"""`task.overlap_envs`: the environments step in a child process, one half while the policy
acts for the other; the episodes are those of the in-process loop."""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest
import torch
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
from lora_runtime.rl.tasks.episodes import ModelPolicy, UniformPolicy, run_episodes
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
    with torch.no_grad():
        return run_episodes(task, SEEDS, ModelPolicy(policy, torch.Generator().manual_seed(5), greedy), record=record)


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


def test_unrecorded_random_episodes_match(setup):
    _, _, _, plain, overlapped = setup
    runs = [run_episodes(t, SEEDS, UniformPolicy(t.num_actions_per_step, torch.Generator().manual_seed(2)), record=False)
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


def test_training_with_overlap_equals_training_without(setup, tmp_path):
    root = setup[0]
    results, adapters = [], []
    for overlap in (False, True):
        out = tmp_path / f"run_{overlap}"
        raw = tiny_episodic_raw(out, root / "base16", task={"prev_action": True, "overlap_envs": overlap})
        train(validate_config(raw), log=quiet)
        results.append(read_metrics(str(out / "metrics.jsonl")))
        adapters.append(load_file(str(out / "adapter" / "adapter_model.safetensors")))
    keys = ("reward_mean", "success_rate", "env_steps", "trained_rows")
    assert [[r[k] for k in keys] for r in results[0]] == [[r[k] for k in keys] for r in results[1]]
    assert all(r["success_rate"] > 0 and r["trained_rows"] > 0 for r in results[0])  # the updates had a signal
    for a, b in zip(results[0], results[1], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
    assert adapters[0].keys() == adapters[1].keys()
    for name, weight in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], weight, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("change", "message"), [
    ({"algorithm": {"name": "ppo", "rollout_steps": 4}}, r"task.overlap_envs=true is not supported with algorithm.name: ppo"),
    ({"runner": {"compile": True}}, r"task.overlap_envs=true cannot be used with runner.compile=true"),
])
def test_refused_combinations_name_the_keys_and_leave_nothing(setup, tmp_path, change, message):
    raw = setup[1]
    run = {**raw, "task": {**raw["task"], "overlap_envs": True},
           "runner": {**raw["runner"], "output_dir": str(tmp_path / "refused"), **change.get("runner", {})}}
    if "algorithm" in change:
        run["algorithm"] = {**change["algorithm"], "lr": 1e-3}
    with pytest.raises(ConfigError, match=message):
        train(validate_config(run), log=quiet)
    assert not (tmp_path / "refused").exists()
