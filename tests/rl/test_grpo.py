"""The GRPO pieces on hand-computed examples: the clipped surrogate on both sides of the clip
for positive and negative advantages, the KL estimator and its weight, group advantages,
temperature, the log-probs of the chosen actions, and `update_epochs > 1` clipping."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lora_runtime.rl import grpo

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
    one = grpo.action_log_probs(logits, ids, temperature=1.0)
    two = grpo.action_log_probs(logits, ids, temperature=2.0)
    assert one.dtype == torch.float32 and one.shape == (1, 2)
    assert one.exp()[0].tolist() == pytest.approx([0.2, 0.8], abs=1e-6)
    assert two.exp()[0].tolist() == pytest.approx([1 / 3, 2 / 3], abs=1e-6)  # logits / 2: 0, ln 2
    assert torch.equal(grpo.action_log_probs(logits, ids), one)  # the default temperature is 1


def fixed_logits_fn(row: list[float], vocab: int = 6):
    """A `logits_fn` that ignores its inputs: the same logits at every position."""
    base = torch.tensor(row)

    def fn(model, scenes, input_ids, image_repeats):
        n, t = input_ids.shape
        out = torch.full((n, t, vocab), -3.0)
        out[..., vocab - len(row):] = base
        return out

    return fn


@pytest.mark.parametrize("temperature, p1", [(1.0, 0.8), (2.0, 2 / 3)])
def test_sample_actions_follows_the_tempered_distribution(temperature, p1):
    scenes = SimpleNamespace(prompt_ids=torch.tensor([[1, 2, 3]] * 50))
    ids = torch.tensor([4, 5])
    fn = fixed_logits_fn([0.0, math.log(4.0)])
    gen = torch.Generator().manual_seed(0)
    tokens, bins, logp = grpo.sample_actions(None, fn, scenes, ids, 2, 80, temperature, gen)
    assert tokens.shape == (4000, 4) and bins.shape == (4000, 2) and logp.shape == (4000, 2)
    assert tokens[:, 3].tolist() == ids[bins[:, 0]].tolist()  # the first action fed back
    freq = bins.float().mean().item()
    assert freq == pytest.approx(p1, abs=0.02)  # 8000 draws: std of the mean ~0.005
    expected = torch.where(bins == 1, math.log(p1), math.log(1 - p1))
    assert torch.allclose(logp, expected.float(), atol=1e-6)  # log-prob of the chosen bin


def test_policy_log_probs_gather_the_taken_actions():
    vocab, ids = 7, torch.tensor([4, 5, 6])
    logits = torch.randn(3, 5, vocab, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rollout = SimpleNamespace(action_bins=torch.tensor([[0, 2], [1, 1], [2, 0]]), scenes=None,
                              input_ids=torch.zeros(3, 5, dtype=torch.long), group_size=1)
    logp, dist = grpo.policy_log_probs(None, lambda m, s, i, g: logits, rollout, ids, temperature=1.5)
    ref = torch.log_softmax(logits[:, -2:, 4:] / 1.5, dim=-1)  # [3, 2, 3], last A positions
    assert torch.allclose(dist.double(), ref, atol=1e-6)
    for n in range(3):
        for a in range(2):
            assert logp[n, a].item() == pytest.approx(ref[n, a, rollout.action_bins[n, a]].item(), abs=1e-6)


def test_collect_rollout_scores_and_draws_only_from_its_generator():
    scenes = SimpleNamespace(prompt_ids=torch.tensor([[1, 2, 3]] * 4))
    task = SimpleNamespace(num_actions=2, reward=lambda s, bins: (bins[:, 0] == 1).float())  # [B*G]
    fn, ids = fixed_logits_fn([0.0, 0.0]), torch.tensor([4, 5])
    runs = []
    for global_seed in (0, 1):  # the global generator must not matter
        torch.manual_seed(global_seed)
        runs.append(grpo.collect_rollout(None, fn, task, scenes, ids, 8, 1.0, torch.Generator().manual_seed(3)))
    a, b = runs
    assert torch.equal(a.action_bins, b.action_bins) and a.action_bins.shape == (32, 2)
    assert torch.equal(a.rewards, (a.action_bins[:, 0] == 1).float())
    assert torch.equal(a.advantages, grpo.group_advantages(a.rewards, 8)) and a.group_size == 8
    assert torch.allclose(a.old_logp, torch.full((32, 2), math.log(0.5)))


def test_update_epochs_above_one_clip(tmp_path):
    """With one update the ratio is exactly 1 (nothing to clip); more updates move it past
    the clip range, and `clip_frac` says so."""
    from support.tiny_runs import tiny_raw

    from lora_runtime.config import validate_config
    from lora_runtime.rl.actor_setup import build_actor, logits_fn_for, make_task
    from lora_runtime.rl.step import Reference, rl_step

    def one_step(epochs):
        raw = tiny_raw(tmp_path / "o", tmp_path / "b", update_epochs=epochs, lr=0.5, clip_eps=0.05)
        raw["actor"]["builtin"]["pretrain_steps"] = 0
        cfg = validate_config(raw)
        torch.manual_seed(0)
        model = build_actor(cfg, create_base=False, log=lambda m: None)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.5)
        task = make_task(cfg, model)
        return rl_step(model, model, logits_fn_for(model), Reference(model, "new"), opt, task,
                       cfg.trainer, torch.Generator().manual_seed(0), torch.device("cpu"))

    assert one_step(1)["clip_frac"] == 0.0
    assert one_step(3)["clip_frac"] > 0.1
