"""`task.prev_action`: the prompt of a multi-step task ends with the previous action's token.

Checked: the token is the environment's own previous action (BOS at an episode's first
step) in every recorded step, the warm start and RL read it, the base is cached apart from
the one without it (and the old bases keep their hash), and the key is refused where it
means nothing.
"""

from __future__ import annotations

import os

import pytest
import torch
from support.tiny_episodic import tiny_episodic_raw
from support.tiny_runs import quiet, tiny_raw

from lora_runtime.config import ConfigError, validate_config
from lora_runtime.rl.actor_setup import builtin_base_dir, load_base, make_task
from lora_runtime.rl.episodes import UniformPolicy, run_episodes
from lora_runtime.rl.outputs import read_metrics
from lora_runtime.rl.tasks.episodic import BOS
from lora_runtime.rl.tasks.episodic import quiet as env_quiet
from lora_runtime.rl.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-iteration new-LoRA run with prev_action (it builds its own warm-started base)."""
    root = tmp_path_factory.mktemp("prev")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = validate_config(tiny_episodic_raw(root / "run", root / "base", task={"prev_action": True}))
    return root, cfg, train(cfg, log=quiet)


def test_every_recorded_prompt_ends_with_its_episodes_previous_action(trained):
    _, cfg, _ = trained
    task = make_task(cfg, load_base(cfg, create=False))
    seeds = [3, 4, 5, 6, 7, 3]  # more episodes than the 4 environments: a second round starts afresh
    eps = run_episodes(task, seeds, UniformPolicy(task.num_actions_per_step, torch.Generator().manual_seed(1)))
    last = eps.obs.prompt_ids.gather(1, (eps.obs.lengths - 1)[:, None])[:, 0]  # [S] the token the action is read at
    for e in range(len(seeds)):
        steps = (eps.episode == e).nonzero()[:, 0]  # in order
        want = [BOS] + task.action_ids[eps.actions[steps[:-1]]].tolist()
        assert last[steps].tolist() == want, e
    plain = make_task(validate_config(tiny_episodic_raw(cfg.trainer.output_dir, cfg.trainer.base_dir)),
                      load_base(cfg, create=False))
    again = run_episodes(plain, seeds, UniformPolicy(task.num_actions_per_step, torch.Generator().manual_seed(1)))
    assert torch.equal(again.actions, eps.actions)  # same episodes; the prompt is one token shorter
    assert torch.equal(again.obs.lengths + 1, eps.obs.lengths)
    for r, n in enumerate(again.obs.lengths.tolist()):  # the same mission words in front of the token
        assert torch.equal(eps.obs.prompt_ids[r, :n], again.obs.prompt_ids[r, :n])


def test_encode_without_previous_actions_starts_an_episode(trained):
    _, cfg, _ = trained
    task = make_task(cfg, load_base(cfg, create=False))
    with env_quiet():
        observations, _ = task.env.reset(seed=[11, 12, 13, 14])
    obs = task.split(observations)
    first = task.encode(obs)
    chosen = task.encode(obs, [-1, 0, 6, 2])
    end = lambda b: b.prompt_ids.gather(1, (b.lengths - 1)[:, None])[:, 0].tolist()
    assert end(first) == [BOS] * 4
    assert end(chosen) == [BOS, *task.action_ids[[0, 6, 2]].tolist()]


def test_a_run_with_prev_action_trains_from_its_own_base(trained):
    root, cfg, result = trained
    records = read_metrics(os.path.join(result.output_dir, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2] and sum(r["trained_steps"] for r in records) > 0
    plain = validate_config(tiny_episodic_raw(root / "run", root / "base"))
    assert builtin_base_dir(cfg) != builtin_base_dir(plain)  # a base that reads the token is cached apart
    assert "prev_action" not in plain.task.base_recipe()  # the bases built before the key keep their folder
    assert cfg.task.base_recipe()["prev_action"] is True


@pytest.mark.parametrize("raw, words", [
    (lambda p: tiny_raw(p / "r", p / "b"), ["task.prev_action", "multi-step", "reach"]),
    (lambda p: tiny_episodic_raw(p / "r", p / "b"), ["task.prev_action", "got 'yes'", "valid boolean"]),
])
def test_bad_prev_action_is_refused(tmp_path, raw, words):
    data = raw(tmp_path)
    data["task"]["prev_action"] = True if data["task"].get("kind", "reach") == "reach" else "yes"
    with pytest.raises(ConfigError) as err:
        validate_config(data)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not os.listdir(tmp_path)
