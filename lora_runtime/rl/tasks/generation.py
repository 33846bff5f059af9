"""Sampling completions from a language-model actor: prefill once per prompt, decode with a
KV cache, stop at EOS.

`generate` prefills the `B` distinct prompts once, repeats the cache `G` times (a GRPO
group shares its prompt), then decodes one token per forward for all `B * G` rows. Under
`torch.no_grad` every LoRA layer takes the runtime's inference op (no autograd; sibling
projections as one grouped op when the actor's siblings are grouped). The log-probability
of each sampled token is the full-vocabulary softmax at the policy's temperature (what the
update recomputes); `top_p` only narrows what is drawn, as in TRL and vLLM.
`use_cache=False` recomputes the whole sequence at every step (the test reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_runtime.parallel import get_world_size, reduce_metrics
from lora_runtime.rl.models import ModelInputs
from lora_runtime.rl.policy import ActorPolicy, gumbel_sample


@dataclass
class Generation:
    """`N = B * G` completions of at most `A` tokens."""

    tokens: torch.Tensor  # [N, A] long, `pad_id` after the end
    logp: torch.Tensor  # [N, A] float32 log-prob of each token when drawn (0 after the end)
    mask: torch.Tensor  # [N, A] float32, 1 for the completion's tokens (its EOS included)


def left_pad(prompts: list[list[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, P]` ids left-padded with `pad_id` and their `[B, P]` attention mask; `P` is the
    longest prompt, or `width` when given (ranks pad their shares as one process pads all)."""
    width = max(len(p) for p in prompts) if width is None else width
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
    return ids, mask


def top_p_filter(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """`logp [N, V]` with the tokens outside the smallest set of mass >= `top_p` at -inf
    (nucleus sampling, Holtzman et al. 2020, arXiv:1904.09751); the top token always stays."""
    if top_p >= 1.0:
        return logp
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()  # mass of the tokens ranked above
    drop = before >= top_p
    return logp.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


@torch.no_grad()
def generate(policy: ActorPolicy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int,
             max_new_tokens: int, eos_ids: tuple[int, ...], pad_id: int, generator: torch.Generator | None,
             top_p: float = 1.0, use_cache: bool = True, stop_early: bool = True, sync_ranks: bool = False,
             rows: slice | None = None, total_rows: int | None = None) -> Generation:
    """Samples `group_size` completions of each prompt (greedy when `generator` is None).

    Args:
        policy: the actor; its `temperature` scales the logits.
        prompt_ids, prompt_mask: `[B, P]` left-padded prompts (`left_pad`), on the actor's device.
        eos_ids: the ids that end a completion.
        stop_early: stop decoding once every row has ended (False: always `max_new_tokens`).
        sync_ranks: every torchrun rank generates together (a training rollout): stop once
            every rank's rows have ended, so that all take the same number of forwards.
        rows, total_rows: ranks that share one sampling stream: these `N` rows are rows `rows`
            of `total_rows` (`gumbel_sample`), so the ranks together draw what one process draws.

    Returns:
        The completions, rows `i*G ... (i+1)*G - 1` answering prompt `i`.
    """
    model, family, temp = policy.model, policy.family, policy.temperature
    device = prompt_ids.device
    eos = torch.tensor(eos_ids, device=device)
    mask = prompt_mask.repeat_interleave(group_size, dim=0)  # [N, P]
    ids = prompt_ids.repeat_interleave(group_size, dim=0)  # [N, P]
    cache = None
    if use_cache:
        logits, cache = family.decode(model, prompt_ids, prompt_mask, None)  # [B, V]
        logits = logits.repeat_interleave(group_size, dim=0)  # [N, V]
        cache = family.repeat_cache(cache, group_size)
    else:
        logits = _last_logits(policy, ids, mask)
    n = ids.shape[0]
    done = torch.zeros(n, dtype=torch.bool, device=device)
    tokens, logps, masks = [], [], []
    for t in range(max_new_tokens):
        logp = torch.log_softmax(logits.float() / temp, dim=-1)  # [N, V]
        if generator is None:
            token = logp.argmax(dim=-1)
        else:
            token = gumbel_sample(top_p_filter(logp, top_p), generator, rows, total_rows)  # [N]
        alive = ~done
        tokens.append(torch.where(alive, token, pad_id))
        logps.append(torch.where(alive, logp.gather(-1, token[:, None])[:, 0], 0.0))
        masks.append(alive.float())
        done = done | torch.isin(token, eos)
        if t + 1 == max_new_tokens or (stop_early and _all_done(done, sync_ranks)):
            break
        step = tokens[-1][:, None]  # [N, 1]
        mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
        if use_cache:
            logits, cache = family.decode(model, step, mask, cache)
        else:
            ids = torch.cat([ids, step], dim=1)
            logits = _last_logits(policy, ids, mask)
    pad = max_new_tokens - len(tokens)
    tokens += [torch.full((n,), pad_id, device=device)] * pad
    logps += [torch.zeros(n, device=device)] * pad
    masks += [torch.zeros(n, device=device)] * pad
    return Generation(torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(masks, 1))


def _all_done(done: torch.Tensor, sync_ranks: bool) -> bool:
    """Whether every row has ended (with `sync_ranks`, on every rank: DDP and FSDP2 ranks
    must take the same number of forwards, FSDP2 gathering the weights in each, so a rank
    whose rows have all ended decodes on, its rows masked, until the others' have too)."""
    ended = bool(done.all())
    if sync_ranks and get_world_size() > 1:
        return bool(reduce_metrics({"ended": float(ended)}, "min")["ended"])
    return ended


def _last_logits(policy: ActorPolicy, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[N, V]` logits at the last position, from one uncached forward."""
    inputs = ModelInputs(None, None, ids, mask.sum(1), attention_mask=mask)
    return policy.family.logits(policy.model, inputs)[:, -1]


def update_inputs(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int,
                  gen: Generation) -> tuple[ModelInputs, torch.Tensor]:
    """What the update reads: `[N, P + A - 1]` prompt then completion (the last token is
    predicted, never read), and the `[N, A]` positions whose logits predict each token."""
    ids = torch.cat([prompt_ids.repeat_interleave(group_size, dim=0), gen.tokens[:, :-1]], dim=1)
    mask = torch.cat([prompt_mask.repeat_interleave(group_size, dim=0),
                      torch.ones_like(gen.tokens[:, :-1])], dim=1)
    p, a = prompt_ids.shape[1], gen.tokens.shape[1]
    positions = torch.arange(p - 1, p + a - 1, device=ids.device).expand(len(ids), -1)  # [N, A]
    return ModelInputs(None, None, ids, mask.sum(1), attention_mask=mask), positions
