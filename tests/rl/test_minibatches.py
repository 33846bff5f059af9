"""`algorithm.minibatches`: PPO-style minibatch updates of the GRPO step.

`minibatches: 1` must be the update it replaced (one AdamW step per epoch over every kept
step), bit for bit; `M` minibatches make `M * update_epochs` optimizer steps over a random
split drawn from the run's generator (reproducible, and continued exactly by a resume).
Also here: the warm start's recorded success follows `task.eval_episodes` (it is not part
of the cached base's hash).
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from support.models import collect_groups
from support.tiny_episodic import tiny_episodic_raw
from support.tiny_runs import quiet, tiny_raw

from lora_runtime.adapters.peft_format import ADAPTER_WEIGHTS_NAME
from lora_runtime.config import ConfigError, validate_config
from lora_runtime.rl.actor_builder import build_actor
from lora_runtime.rl.algorithms import group_advantages, grpo
from lora_runtime.rl.builtin_base import (
    base_report,
    builtin_base_dir,
    ensure_builtin_base,
    load_base,
)
from lora_runtime.rl.learners import learner_for
from lora_runtime.rl.loop import minibatch_indices, rl_step
from lora_runtime.rl.outputs import read_metrics
from lora_runtime.rl.policy import ActorPolicy, action_dist
from lora_runtime.rl.reference import Reference
from lora_runtime.rl.seeding import RunSeeds
from lora_runtime.rl.tasks import build_task as make_task
from lora_runtime.rl.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mb_base")
    torch.set_num_threads(1)
    ensure_builtin_base(validate_config(tiny_episodic_raw(folder / "x", folder)), log=quiet)
    return folder


class Setup:
    """A tiny BabyAI actor (new LoRA with random non-zero lora_B), its task, optimizer and generator."""

    def __init__(self, base, tmp_path, **trainer) -> None:
        self.cfg = validate_config(tiny_episodic_raw(tmp_path / "run", base, **trainer))
        torch.manual_seed(0)
        self.model = build_actor(self.cfg, log=quiet)
        with torch.no_grad():  # a zero lora_B would hide the adapter's path through the forward
            gen = torch.Generator().manual_seed(5)
            for name, p in self.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        self.task = make_task(self.cfg, self.model)
        self.reference = Reference(self.model, "new")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.algorithm.lr, weight_decay=0.0)
        self.generator = RunSeeds(self.cfg.runner.seed).generator("sampling")

    def step(self) -> dict[str, float]:
        policy = ActorPolicy(self.model, self.task.family, self.task.action_ids, self.cfg.algorithm.temperature)
        return rl_step(self.model, policy, learner_for(self.cfg.algorithm), self.task, self.reference, self.optimizer,
                       self.cfg, self.generator, torch.device("cpu"))

    def trained(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}


def one_step_per_epoch(s: Setup) -> tuple[dict[str, torch.Tensor], int]:
    """The update before `algorithm.minibatches`, written out: every epoch, one AdamW step on
    the clipped-surrogate + KL loss over all kept steps, each episode's steps weighted
    `(N / E) / L_e` (GRPO's sequence mean over episodes; fewer than 512 rows here: one pass)."""
    cfg = s.cfg.algorithm
    eps = collect_groups(s.model, s.task, cfg.batch_size, cfg.group_size, cfg.temperature, s.generator)
    adv = group_advantages(eps.returns, cfg.group_size)[eps.episode]  # [S]
    keep = adv.ne(0).nonzero()[:, 0]  # [S']
    obs, actions, old_logp, adv = eps.obs.select(keep), eps.actions[keep], eps.logp[keep], adv[keep]
    ids, last = s.task.action_ids, (obs.lengths - 1)[:, None]  # [K], [S', 1]
    episodes = eps.episode[keep].tolist()
    lengths = {e: episodes.count(e) for e in set(episodes)}
    weights = (len(keep) / len(lengths)) / torch.tensor([float(lengths[e]) for e in episodes])  # [S']

    def dists(m):  # [S', 1, K] the library's log-probs at the action position (tested in test_grpo)
        return action_dist(m, s.task.family, obs, last, ids, cfg.temperature)

    ref = s.reference.apply(dists)
    s.model.train()
    for _ in range(cfg.update_epochs):
        s.optimizer.zero_grad(set_to_none=True)
        dist = dists(s.model)
        logp = dist.gather(-1, actions[:, None, None])[..., 0]  # [S', 1]
        kl = grpo.kl_divergence(dist, ref)  # [S', 1]
        loss, _ = grpo.grpo_loss(logp, old_logp[:, None], adv, kl, cfg.clip_eps, cfg.kl_coef, row_weights=weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s.params, cfg.max_grad_norm)
        s.optimizer.step()
    return s.trained(), len(keep)


def adam_steps(optimizer: torch.optim.Optimizer) -> set[int]:
    return {int(st["step"]) for st in optimizer.state.values()}


def test_split_covers_every_kept_step_once_and_one_minibatch_draws_nothing():
    gen = torch.Generator().manual_seed(3)
    before = gen.get_state()
    (whole,) = minibatch_indices(10, 1, gen)
    assert torch.equal(whole, torch.arange(10)) and torch.equal(gen.get_state(), before)  # today's order, no draw
    parts = minibatch_indices(10, 4, gen)
    assert [len(p) for p in parts] == [3, 3, 2, 2]
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(10))
    assert not torch.equal(torch.cat(parts), torch.arange(10))  # shuffled
    again = minibatch_indices(10, 4, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(parts, again))  # from the generator alone
    assert [len(p) for p in minibatch_indices(3, 8, gen)] == [1, 1, 1]  # never an empty minibatch


def test_one_minibatch_is_the_one_step_per_epoch_update_bit_for_bit(base, tmp_path):
    a = Setup(base, tmp_path, update_epochs=3)
    b = Setup(base, tmp_path, update_epochs=3)
    start = a.trained()
    record = a.step()
    want, kept = one_step_per_epoch(b)
    assert kept > 0 and record["trained_rows"] == kept
    got = a.trained()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert any(not torch.equal(got[n], start[n]) for n in got)  # the update moved the adapter
    assert adam_steps(a.optimizer) == {3}
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


def test_m_minibatches_take_m_steps_per_epoch_reproducibly(base, tmp_path):
    runs = [Setup(base, tmp_path, update_epochs=2, minibatches=4) for _ in range(2)]
    records = [r.step() for r in runs]
    assert records[0]["trained_rows"] >= 4
    assert adam_steps(runs[0].optimizer) == {8}  # 4 minibatches x 2 epochs
    a, b = runs[0].trained(), runs[1].trained()
    assert all(torch.equal(a[n], b[n]) for n in a)
    timed = {"rollout_s", "train_s", "step_time_s", "samples_per_s", "env_steps_per_s"}
    assert {k: v for k, v in records[0].items() if k not in timed} == {k: v for k, v in records[1].items() if k not in timed}
    one = Setup(base, tmp_path, update_epochs=2)
    one.step()
    c = one.trained()
    assert any((a[n] - c[n]).abs().max() > 1e-6 for n in a)  # the split changes the update
    for key in ("loss", "kl", "clip_frac", "entropy"):  # the last epoch's means
        assert records[0][key] == records[0][key] and abs(records[0][key]) < 1e3
    assert 0.0 <= records[0]["clip_frac"] <= 1.0 and records[0]["kl"] >= 0.0


def test_a_resumed_minibatch_run_continues_exactly(tmp_path, base):
    def run(out, steps, lora_path=None):
        torch.manual_seed(0)
        raw = tiny_episodic_raw(tmp_path / out, base, lora_path=lora_path, steps=steps, update_epochs=2, minibatches=3)
        return train(validate_config(raw), log=quiet)

    run("new", 2)
    resumed = run("resume", 2, lora_path=tmp_path / "new" / "adapter")
    longer = run("long", 4)
    a = load_file(os.path.join(resumed.output_dir, "adapter", ADAPTER_WEIGHTS_NAME))
    b = load_file(os.path.join(longer.output_dir, "adapter", ADAPTER_WEIGHTS_NAME))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    la = read_metrics(os.path.join(resumed.output_dir, "metrics.jsonl"))
    lb = read_metrics(os.path.join(longer.output_dir, "metrics.jsonl"))[2:]
    assert [r["step"] for r in la] == [3, 4]
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], abs=1e-6)


@pytest.mark.parametrize("value, words", [
    (0, ["algorithm.minibatches", "got 0", "greater than or equal to 1"]),
    (True, ["algorithm.minibatches", "got True", "valid integer"]),
    (2.5, ["algorithm.minibatches", "got 2.5", "valid integer"]),
])
def test_bad_minibatches_are_refused_naming_the_key(tmp_path, value, words):
    raw = tiny_episodic_raw(tmp_path / "r", tmp_path / "b", minibatches=value)
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not os.listdir(tmp_path)


def test_minibatches_run_on_the_reach_task_through_the_same_loop(tmp_path):
    """One loop for every task: the one-step reach task takes `algorithm.minibatches` too."""
    raw = tiny_raw(tmp_path / "r", tmp_path / "b", minibatches=2, update_epochs=2, steps=1)
    raw["actor"]["builtin"]["pretrain_steps"] = 0
    cfg = validate_config(raw)
    torch.manual_seed(0)
    model = build_actor(cfg, create_base=False, log=quiet)
    task = make_task(cfg, model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.algorithm.lr)
    policy = ActorPolicy(model, task.family, task.action_ids, cfg.algorithm.temperature)
    record = rl_step(model, policy, learner_for(cfg.algorithm), task, Reference(model, "new"), opt, cfg,
                     torch.Generator().manual_seed(0), torch.device("cpu"))
    assert record["trained_rows"] > 0 and adam_steps(opt) == {4}  # 2 minibatches x 2 epochs


def test_warm_start_success_follows_eval_episodes(base, tmp_path):
    """The cached base keeps the success it measured with its own eval count; a config with
    another `task.eval_episodes` (same base folder) measures the base again."""
    four = validate_config(tiny_episodic_raw(tmp_path / "run", base))
    six = validate_config(tiny_episodic_raw(tmp_path / "run", base, task={"eval_episodes": 6}))
    folder = builtin_base_dir(four)
    assert builtin_base_dir(six) == folder  # the count is not in the hash
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    marked = copy.deepcopy(config)
    marked["pretrain"]["warm_start_success"] = 0.123  # no 4- or 6-episode rate: shows where a level came from
    with open(path, "w", encoding="utf-8") as f:
        json.dump(marked, f)
    try:
        levels = {}
        for cfg in (four, six):
            model = load_base(cfg, create=False)
            task = make_task(cfg, model)
            task.measure_levels(base_report(cfg), lambda cfg=cfg: load_base(cfg, create=False))
            levels[cfg.task.eval_episodes] = task.levels["warm_start_success"]
            if cfg is six:
                want = task.evaluate(model, 6)["success_rate"]
    finally:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f)
    assert levels[4] == 0.123  # the recorded 4-episode figure is reused
    assert levels[6] == round(want, 5) and levels[6] != 0.123
