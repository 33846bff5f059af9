"""PPO's pieces against references computed by hand in float64 (the formulas written out
step by step, not the library's vectorised loop)."""

from __future__ import annotations

import math

import pytest
import torch

from lora_runtime.rl.algorithms.ppo import gae, normalize, policy_loss, ppo_loss, value_loss

F64 = torch.float64
GAMMA, LAM = 0.9, 0.8


def _t(rows):
    return torch.tensor(rows, dtype=F64)


def test_gae_terminated_episode_is_not_bootstrapped():
    # one env, 3 steps, the episode terminates at step 2 with reward 1
    r, v, nv = _t([[0.0], [0.0], [1.0]]), _t([[0.5], [0.6], [0.7]]), _t([[0.6], [0.7], [99.0]])
    term = torch.tensor([[False], [False], [True]])
    adv, ret = gae(r, v, nv, term, term, GAMMA, LAM)
    d2 = 1.0 - 0.7  # no bootstrap: next value 99 is ignored
    d1 = 0.0 + GAMMA * 0.7 - 0.6
    d0 = 0.0 + GAMMA * 0.6 - 0.5
    a2 = d2
    a1 = d1 + GAMMA * LAM * a2
    a0 = d0 + GAMMA * LAM * a1
    assert torch.allclose(adv[:, 0], _t([a0, a1, a2]), rtol=0, atol=1e-15)
    assert torch.allclose(ret, adv + v, rtol=0, atol=0)


def test_gae_truncated_episode_is_bootstrapped_with_its_final_value():
    r, v, nv = _t([[0.1], [0.2]]), _t([[0.3], [0.4]]), _t([[0.4], [0.55]])  # 0.55: V(final obs)
    trunc = torch.tensor([[False], [True]])
    adv, _ = gae(r, v, nv, torch.zeros_like(trunc), trunc, GAMMA, LAM)
    a1 = 0.2 + GAMMA * 0.55 - 0.4
    a0 = 0.1 + GAMMA * 0.4 - 0.3 + GAMMA * LAM * a1
    assert torch.allclose(adv[:, 0], _t([a0, a1]), rtol=0, atol=1e-15)


def test_gae_mixed_episodes_of_different_lengths_in_a_batch():
    # env 0: an episode of 1 step (terminated, r=1), then one of 2 steps cut by the rollout's end
    # env 1: an episode truncated at step 1, then a new one terminated at step 2 (r=0.5)
    r = _t([[1.0, 0.0], [0.0, 0.0], [0.0, 0.5]])
    v = _t([[0.2, 0.3], [0.4, 0.5], [0.6, 0.7]])
    nv = _t([[7.0, 0.5], [0.6, 0.45], [0.8, 9.0]])  # env 0, t=2: bootstrap of the unfinished episode
    term = torch.tensor([[True, False], [False, False], [False, True]])
    ended = torch.tensor([[True, False], [False, True], [False, True]])
    adv, ret = gae(r, v, nv, term, ended, GAMMA, LAM)
    e0 = [1.0 - 0.2, None, None]
    e0[2] = 0.0 + GAMMA * 0.8 - 0.6
    e0[1] = 0.0 + GAMMA * 0.6 - 0.4 + GAMMA * LAM * e0[2]
    e1 = [None, None, 0.5 - 0.7]
    e1[1] = 0.0 + GAMMA * 0.45 - 0.5  # truncated: bootstrapped with V(final obs) = 0.45, nothing flows back from t=2
    e1[0] = 0.0 + GAMMA * 0.5 - 0.3 + GAMMA * LAM * e1[1]
    assert torch.allclose(adv, _t([[e0[0], e1[0]], [e0[1], e1[1]], [e0[2], e1[2]]]), rtol=0, atol=1e-15)
    assert torch.allclose(ret, adv + v, rtol=0, atol=0)


def test_value_loss_clipping_by_hand():
    values, old, returns = _t([1.0, 0.0, 0.5]), _t([0.5, 0.2, 0.5]), _t([2.0, -1.0, 0.0])
    eps = 0.2
    want = 0.0
    for v, o, ret in zip(values.tolist(), old.tolist(), returns.tolist()):
        clipped_v = o + max(-eps, min(eps, v - o))
        want += max((v - ret) ** 2, (clipped_v - ret) ** 2)
    assert value_loss(values, old, returns, eps).item() == pytest.approx(0.5 * want / 3, abs=1e-15)
    plain = 0.5 * sum((v - ret) ** 2 for v, ret in zip(values.tolist(), returns.tolist())) / 3
    assert value_loss(values, old, returns, None).item() == pytest.approx(plain, abs=1e-15)
    assert value_loss(values, old, returns, eps).item() > plain  # clipping can only raise the loss here


def test_policy_loss_and_the_whole_loss_of_a_tiny_batch_by_hand():
    logp, old = _t([-0.1, -2.0, -0.7]), _t([-0.5, -1.0, -0.7])
    adv = _t([1.0, -0.5, 2.0])
    values, old_v, ret = _t([0.1, 0.2, 0.3]), _t([0.0, 0.25, 0.3]), _t([1.0, 0.0, 0.5])
    entropy = _t([1.0, 0.5, 0.25])
    eps, veps, vf, ent = 0.2, 0.1, 0.5, 0.01
    pg = 0.0
    clipped = 0
    for lp, o, a in zip(logp.tolist(), old.tolist(), adv.tolist()):
        rho = math.exp(lp - o)
        pg += min(rho * a, max(1 - eps, min(1 + eps, rho)) * a)
        clipped += abs(rho - 1) > eps
    pg = -pg / 3
    got_pg, frac = policy_loss(logp, old, adv, eps)
    assert got_pg.item() == pytest.approx(pg, abs=1e-15) and frac.item() == pytest.approx(clipped / 3)
    vl = sum(max((v - r) ** 2, (o + max(-veps, min(veps, v - o)) - r) ** 2)
             for v, o, r in zip(values.tolist(), old_v.tolist(), ret.tolist())) * 0.5 / 3
    loss, stats = ppo_loss(logp, old, adv, values, old_v, ret, entropy, eps, veps, vf, ent)
    assert loss.item() == pytest.approx(pg + vf * vl - ent * (1.75 / 3), abs=1e-15)
    assert stats["value_loss"] == pytest.approx(vl, abs=1e-15) and stats["entropy"] == pytest.approx(1.75 / 3)


def test_the_loss_has_gradients_for_policy_and_value():
    logp = _t([-0.3, -1.2]).requires_grad_()
    values = _t([0.5, -0.5]).requires_grad_()
    loss, _ = ppo_loss(logp, logp.detach(), _t([1.0, -1.0]), values, values.detach(), _t([1.0, 0.0]),
                       _t([0.7, 0.7]), 0.2, 0.2, 0.5, 0.0)
    loss.backward()
    # at ratio 1 the surrogate's gradient is -A/n; the value gradient is vf * (V - R) / n
    assert torch.allclose(logp.grad, _t([-0.5, 0.5]), atol=1e-15)
    assert torch.allclose(values.grad, _t([0.5 * (0.5 - 1.0) / 2, 0.5 * (-0.5 - 0.0) / 2]), atol=1e-15)


def test_normalize():
    a = _t([1.0, 2.0, 3.0, 6.0])
    n = normalize(a)
    assert n.mean().abs().item() < 1e-15 and n.std().item() == pytest.approx(1.0, abs=1e-7)
    assert normalize(_t([4.0])).tolist() == [0.0]
