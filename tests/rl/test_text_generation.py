"""Generation of the text task: the KV-cache path gives the tokens and log-probs of the
uncached reference, on a patched model with grouped siblings, prompts of different lengths;
the update's forward gives back the rollout's log-probs, also after a fused AdamW step."""

from __future__ import annotations

import pytest
import torch

from lora_runtime.adapters import apply_lora, group_siblings, iter_lora_layers
from lora_runtime.rl.models import family_of
from lora_runtime.rl.policy import ActorPolicy, action_dist
from lora_runtime.rl.tasks.generation import generate, left_pad, top_p_filter, update_inputs

pytest.importorskip("transformers")

PROMPTS = [[5, 6, 7], [9], [10, 11, 12, 13, 14], [20, 21]]
EOS, PAD = 2, 3


@pytest.fixture
def policy():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         eos_token_id=EOS, pad_token_id=PAD)).eval()
    apply_lora(model, 4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in iter_lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    family = family_of(model)
    ids, mask = left_pad(PROMPTS, PAD)
    assert group_siblings(model, input_ids=ids, attention_mask=mask)  # q/k/v and gate/up run grouped
    return ActorPolicy(model, family, torch.arange(32), 1.3)


def _logp_at_update(policy, ids, mask, group, gen):
    inputs, positions = update_inputs(ids, mask, group, gen)
    dist = action_dist(policy.model, policy.family, inputs, positions, policy.action_ids, policy.temperature)
    return dist.gather(-1, gen.tokens[..., None])[..., 0]


@pytest.mark.parametrize("sampled", [True, False])
def test_the_kv_cache_gives_the_tokens_of_the_uncached_reference(policy, sampled):
    ids, mask = left_pad(PROMPTS, PAD)
    runs = []
    for use_cache in (True, False):
        gen_rng = torch.Generator().manual_seed(7) if sampled else None
        runs.append(generate(policy, ids, mask, 3, 6, (EOS,), PAD, gen_rng, top_p=0.9, use_cache=use_cache))
    cached, plain = runs
    assert torch.equal(cached.tokens, plain.tokens) and torch.equal(cached.mask, plain.mask)
    torch.testing.assert_close(cached.logp, plain.logp, rtol=1e-5, atol=1e-5)
    assert cached.tokens.shape == (len(PROMPTS) * 3, 6)
    with torch.no_grad():
        again = _logp_at_update(policy, ids, mask, 3, cached)
    torch.testing.assert_close(again * cached.mask, cached.logp, rtol=1e-5, atol=1e-5)


def test_tokens_after_eos_are_padding_and_masked(policy):
    ids, mask = left_pad(PROMPTS, PAD)
    gen = generate(policy, ids, mask, 4, 8, tuple(range(32)), PAD, torch.Generator().manual_seed(0))
    assert (gen.mask[:, 0] == 1).all() and (gen.mask[:, 1:] == 0).all()  # every token ends a completion
    assert (gen.tokens[:, 1:] == PAD).all() and (gen.logp[:, 1:] == 0).all()


def test_top_p_keeps_the_smallest_set_over_p():
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = top_p_filter(logp, 0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert top_p_filter(logp, 0.01).isfinite().tolist() == [[True, False, False, False]]


def test_rollouts_after_a_fused_adamw_step_read_the_new_adapters(policy):
    """The grouped siblings' cached stacked A must not outlive an optimizer step (the fused
    AdamW writes A in place without bumping its version)."""
    ids, mask = left_pad(PROMPTS, PAD)
    params = [p for n, p in policy.model.named_parameters() if "lora_" in n]
    for p in policy.model.parameters():
        p.requires_grad_(any(p is q for q in params))
    opt = torch.optim.AdamW(params, lr=0.05, fused=True)
    for _ in range(2):
        gen = generate(policy, ids, mask, 2, 4, (EOS,), PAD, torch.Generator().manual_seed(3))
        logp = _logp_at_update(policy, ids, mask, 2, gen)  # with grad, as the update's first forward
        torch.testing.assert_close(logp.detach() * gen.mask, gen.logp, rtol=1e-5, atol=1e-5)
        opt.zero_grad()
        (-(logp * gen.mask).sum()).backward()
        opt.step()
