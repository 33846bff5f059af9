"""The GRPO pieces on hand-computed examples: the clipped surrogate on both sides of the clip
for positive and negative advantages, the KL estimator and its weight, group advantages,
temperature, the log-probs of the chosen actions, and `update_epochs > 1` clipping."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lora_runtime.config import ReachSection
from lora_runtime.rl.algorithms import grpo
from lora_runtime.rl.models import ModelInputs
from lora_runtime.rl.policy import action_dist, action_log_probs
from lora_runtime.rl.tasks.reach import ReachTask

EPS = 0.2


def ratios_to_logp(ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(logp, old_logp)` `[len, 1]` float64 with `exp(logp - old_logp) == ratios`."""
    old = torch.tensor([[-1.0]] * len(ratios), dtype=torch.float64)
    logp = (old + torch.log(torch.tensor(ratios, dtype=torch.float64))[:, None]).requires_grad_(True)
    return logp, old


# ratio, advantage -> min(r * A, clip(r, 0.8, 1.2) * A), and whether the clip bound is the one taken
SURROGATE_CASES = [
    (0.5, 1.0, 0.5, False),  # below the clip, A > 0: the unclipped r * A is smaller
    (1.1, 1.0, 1.1, False),  # inside
    (1.5, 1.0, 1.2, True),  # above the clip, A > 0: clipped at 1 + eps, no gradient
    (0.5, -1.0, -0.8, True),  # below the clip, A < 0: clipped at 1 - eps, no gradient
    (0.9, -2.0, -1.8, False),  # inside
    (1.5, -1.0, -1.5, False),  # above the clip, A < 0: the unclipped r * A is smaller
]


@pytest.mark.parametrize("ratio, adv, surrogate, clipped", SURROGATE_CASES)
def test_clipped_surrogate_one_sample(ratio, adv, surrogate, clipped):
    logp, old = ratios_to_logp([ratio])
    loss, stats = grpo.grpo_loss(logp, old, torch.tensor([adv], dtype=torch.float64),
                                 torch.zeros(1, 1, dtype=torch.float64), EPS, kl_coef=0.0)
    assert loss.item() == pytest.approx(-surrogate, abs=1e-12)
    assert stats["pg_loss"] == pytest.approx(-surrogate, abs=1e-12)
    assert stats["clip_frac"] == (1.0 if abs(ratio - 1.0) > EPS else 0.0)
    loss.backward()
    # d(-r A)/d logp = -r A where the unclipped term is taken; 0 where the clip bound is
    assert logp.grad.item() == pytest.approx(0.0 if clipped else -ratio * adv, abs=1e-12)


def test_clipped_surrogate_averages_over_samples_and_tokens():
    ratios = [c[0] for c in SURROGATE_CASES]
    logp, old = ratios_to_logp(ratios)
    logp2 = torch.cat([logp, logp], dim=1)  # [6, 2]: two action tokens with the same ratio
    old2 = torch.cat([old, old], dim=1)
    adv = torch.tensor([c[1] for c in SURROGATE_CASES], dtype=torch.float64)
    loss, stats = grpo.grpo_loss(logp2, old2, adv, torch.zeros(6, 2, dtype=torch.float64), EPS, 0.0)
    expected = -sum(c[2] for c in SURROGATE_CASES) / len(SURROGATE_CASES)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert stats["clip_frac"] == pytest.approx(4 / 6)  # 0.5, 1.5, 0.5, 1.5 are outside [0.8, 1.2]


def test_kl_term_is_weighted_by_kl_coef():
    logp, old = ratios_to_logp([1.0, 1.0])
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    kl = torch.tensor([[0.3], [0.1]], dtype=torch.float64, requires_grad=True)
    loss, stats = grpo.grpo_loss(logp, old, adv, kl, EPS, kl_coef=0.5)
    # pg: -(1 - 1) / 2 = 0; kl mean 0.2; loss = 0 + 0.5 * 0.2
    assert stats["pg_loss"] == pytest.approx(0.0, abs=1e-12)
    assert stats["kl"] == pytest.approx(0.2, abs=1e-12)
    assert loss.item() == pytest.approx(0.1, abs=1e-12)
    loss.backward()
    assert torch.allclose(kl.grad, torch.full((2, 1), 0.25, dtype=torch.float64))  # 0.5 / 2


def test_kl_divergence_exact_against_hand_values():
    p = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]], dtype=torch.float64).log()  # [1, 2, 2]
    q = torch.tensor([[[0.25, 0.75], [0.9, 0.1]]], dtype=torch.float64).log()
    kl = grpo.kl_divergence(p, q)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl.shape == (1, 2)
    assert kl[0, 0].item() == pytest.approx(expected, abs=1e-14)
    assert kl[0, 1].item() == pytest.approx(0.0, abs=1e-14)
    # KL(p || q), not KL(q || p): they differ here
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert abs(expected - reverse) > 1e-3


def test_group_advantages_mean_and_std_per_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    adv = grpo.group_advantages(rewards, group_size=4)
    # group 1: mean 0.25, unbiased std sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    # group 2: all equal -> 0; group 3: mean 0.5, std sqrt(4 * 0.25 / 3)
    s3 = math.sqrt(1.0 / 3.0)
    expected = [1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0, -0.5 / s3, 0.5 / s3, -0.5 / s3, 0.5 / s3]
    assert adv.tolist() == pytest.approx(expected, abs=1e-5)
    assert torch.isfinite(adv).all()
    # float64: exactly (r - mean) / (std + eps), eps = 1e-6 added to the std
    adv64 = grpo.group_advantages(rewards.double(), group_size=4)
    assert adv64[:4].tolist() == pytest.approx([0.75 / (0.5 + 1e-6)] + [-0.25 / (0.5 + 1e-6)] * 3, abs=1e-12)


def test_action_log_probs_keep_only_action_ids_and_apply_temperature():
    logits = torch.full((1, 6), 5.0)  # ids 0..3 are not actions and must not matter
    logits[0, 4], logits[0, 5] = 0.0, math.log(4.0)
    ids = torch.tensor([4, 5])
    one = action_log_probs(logits, ids, temperature=1.0)
    two = action_log_probs(logits, ids, temperature=2.0)
    assert one.dtype == torch.float32 and one.shape == (1, 2)
    assert one.exp()[0].tolist() == pytest.approx([0.2, 0.8], abs=1e-6)
    assert two.exp()[0].tolist() == pytest.approx([1 / 3, 2 / 3], abs=1e-6)  # logits / 2: 0, ln 2
    assert torch.equal(action_log_probs(logits, ids), one)  # the default temperature is 1


class FixedPolicy:
    """A policy that ignores its inputs: the same tempered distribution at every position."""

    def __init__(self, row: list[float], action_ids: torch.Tensor, temperature: float) -> None:
        self.action_ids, self.logp = action_ids, torch.log_softmax(torch.tensor(row) / temperature, dim=-1)

    def __call__(self, inputs, positions):
        return self.logp.expand(len(inputs), positions.shape[1], -1), None  # [N, A, K]


def reach(num_objects: int = 1) -> ReachTask:
    """A 2x2 reach task (two action tokens of two bins) for a 16-token vocabulary."""
    return ReachTask(ReachSection(grid=2, num_objects=num_objects, num_colors=2, noise=0.0), 4, 16)


@pytest.mark.parametrize("temperature, p1", [(1.0, 0.8), (2.0, 2 / 3)])
def test_sampling_follows_the_tempered_distribution(temperature, p1):
    task = reach()
    gen = torch.Generator().manual_seed(0)
    exp = task.collect(FixedPolicy([0.0, math.log(4.0)], task.action_ids, temperature), 50, 80, gen)
    bins, tokens = exp.actions, exp.inputs.prompt_ids
    assert tokens.shape == (4000, 4) and bins.shape == (4000, 2) and exp.old_logp.shape == (4000, 2)
    assert tokens[:, 3].tolist() == task.action_ids[bins[:, 0]].tolist()  # the first action fed back
    assert exp.positions[0].tolist() == [2, 3]  # the logits at 2 and 3 chose the two tokens
    freq = bins.float().mean().item()
    assert freq == pytest.approx(p1, abs=0.02)  # 8000 draws: std of the mean ~0.005
    expected = torch.where(bins == 1, math.log(p1), math.log(1 - p1))
    assert torch.allclose(exp.old_logp, expected.float(), atol=1e-6)  # log-prob of the chosen bin


def test_action_dist_reads_the_action_ids_at_the_positions():
    vocab, ids = 7, torch.tensor([4, 5, 6])
    logits = torch.randn(3, 5, vocab, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    family = SimpleNamespace(logits=lambda model, inputs: logits)
    inputs = ModelInputs(None, None, torch.zeros(3, 5, dtype=torch.long), torch.full((3,), 5))
    positions = torch.tensor([[3, 4], [0, 2], [4, 4]])
    dist = action_dist(None, family, inputs, positions, ids, temperature=1.5)
    for n in range(3):
        for a in range(2):
            want = torch.log_softmax(logits[n, positions[n, a], 4:] / 1.5, dim=-1)
            assert torch.allclose(dist[n, a].double(), want, atol=1e-6)


def test_collect_scores_and_draws_only_from_its_generator():
    task = reach(num_objects=2)
    runs = []
    for global_seed in (0, 1):  # the global generator must not matter
        torch.manual_seed(global_seed)
        runs.append(task.collect(FixedPolicy([0.0, 0.0], task.action_ids, 1.0), 4, 8, torch.Generator().manual_seed(3)))
    a, b = runs
    assert torch.equal(a.actions, b.actions) and a.actions.shape == (32, 2)
    assert torch.equal(a.inputs.pixels, b.inputs.pixels) and a.inputs.repeats == 8  # one image per group
    assert a.returns.shape == (32,) and set(a.returns.tolist()) <= {0.0, 1.0}
    assert a.episode.tolist() == list(range(32)) and a.group_size == 8
    assert torch.allclose(a.old_logp, torch.full((32, 2), math.log(0.5)))


def test_update_epochs_above_one_clip(tmp_path):
    """With one update the ratio is exactly 1 (nothing to clip); more updates move it past
    the clip range, and `clip_frac` says so."""
    from support.tiny_runs import tiny_raw

    from lora_runtime.config import validate_config
    from lora_runtime.rl.actor_builder import build_actor
    from lora_runtime.rl.learners import learner_for
    from lora_runtime.rl.loop import rl_step
    from lora_runtime.rl.policy import ActorPolicy
    from lora_runtime.rl.reference import Reference
    from lora_runtime.rl.tasks import build_task

    def one_step(epochs):
        raw = tiny_raw(tmp_path / "o", tmp_path / "b", update_epochs=epochs, lr=0.5, clip_eps=0.05)
        raw["actor"]["builtin"]["pretrain_steps"] = 0
        cfg = validate_config(raw)
        torch.manual_seed(0)
        model = build_actor(cfg, create_base=False, log=lambda m: None)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.5)
        task = build_task(cfg, model)
        policy = ActorPolicy(model, task.family, task.action_ids, cfg.algorithm.temperature)
        return rl_step(model, policy, learner_for(cfg.algorithm), task, Reference(model, "new"), opt, cfg,
                       torch.Generator().manual_seed(0), torch.device("cpu"))

    assert one_step(1)["clip_frac"] == 0.0
    assert one_step(3)["clip_frac"] > 0.1


def test_episode_weights_make_the_row_mean_a_mean_over_episodes():
    """Rows that are steps of episodes of lengths 1, 2 and 5: with `sequence_mean` weights the
    row mean of any per-row terms equals the mean over episodes of each episode's step mean
    (float64 reference); `dr_grpo` divides by the longest episode; one row per rollout and
    `token_mean` need no weights; an unknown loss_type is refused."""
    from lora_runtime.rl.algorithms.grpo import episode_weights

    episode = torch.tensor([7, 3, 3, 9, 9, 9, 9, 9])
    terms = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = episode_weights(episode, "sequence_mean")
    want = sum(terms[episode == e].mean() for e in (7, 3, 9)) / 3
    assert torch.allclose((w.double() * terms).mean(), want, rtol=1e-6, atol=0)
    dr = episode_weights(episode, "dr_grpo")
    assert torch.allclose((dr.double() * terms).mean(), sum(terms[episode == e].sum() / 5 for e in (7, 3, 9)) / 3,
                          rtol=1e-6, atol=0)
    assert episode_weights(episode, "token_mean") is None
    assert episode_weights(torch.arange(4), "sequence_mean") is None
    with pytest.raises(ValueError, match="loss_type='seq': expected sequence_mean, token_mean or dr_grpo"):
        episode_weights(episode, "seq")


def test_row_weights_scale_each_rows_surrogate_and_kl():
    logp = torch.log(torch.tensor([[0.5], [0.25], [0.2]]))
    old = logp.detach().clone()
    adv, kl = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([[0.1], [0.2], [0.4]])
    w = torch.tensor([3.0, 0.0, 0.5])
    loss, stats = grpo.grpo_loss(logp, old, adv, kl, 0.2, 0.5, row_weights=w)
    # ratio 1: surrogate = adv; loss = -mean(w * adv) + 0.5 * mean(w * kl)
    assert stats["pg_loss"] == pytest.approx(-(3.0 * 1.0 + 0.0 + 0.5 * 0.5) / 3)
    assert stats["kl"] == pytest.approx((0.3 + 0.0 + 0.2) / 3)
    assert loss.item() == pytest.approx(stats["pg_loss"] + 0.5 * stats["kl"])
