"""The text task: a language model answers prompts, reward functions score the answers.

The usual LoRA-RL job today (TRL's `GRPOTrainer`, veRL, Unsloth): GRPO on a causal LM with
a verifiable reward. A step draws `batch_size` prompts of the training set, samples
`group_size` completions of each with a KV cache (`generation.generate`, at most
`task.max_new_tokens` tokens, EOS ends one), decodes them with the model's tokenizer and
scores them with `task.reward` (TRL's contract, `rewards`). The `Experience` rows are the
completions; each token is one action over the whole vocabulary; tokens after the EOS are
masked out of the loss.

The prompts come from `task.dataset` (JSONL) or, with `dataset: null`, the built-in
additions (`text_warm_start.additions`). Held-out prompts (`task.eval_dataset`, or the last
`task.eval_fraction` of the set) are never trained on; `evaluate` answers them greedily.

Under torchrun (`runner.distributed: ddp | fsdp`) every rank draws the whole step's prompts
and sampling noise from one shared stream and answers its contiguous share of the prompts
(padded to the width of the whole batch), decoding until every rank's completions have
ended: the ranks together sample what one process samples, and take the same forwards.

Not supported (refused before any work): PPO (a value per token is not implemented).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from lora_runtime.adapters import unwrap_model
from lora_runtime.config import ConfigError, RunConfig, TextSection
from lora_runtime.parallel import get_world_size, rank_slice, reduce_metrics
from lora_runtime.rl.models import ModelFamily, ModelInputs
from lora_runtime.rl.models.tiny_lm import build_tiny_lm
from lora_runtime.rl.policy import ActorPolicy
from lora_runtime.rl.seeding import base_seeds
from lora_runtime.rl.tasks.base import Experience, Task
from lora_runtime.rl.tasks.generation import generate, left_pad, update_inputs
from lora_runtime.rl.tasks.rewards import Reward, columns_of, load_jsonl, load_reward, total_rewards
from lora_runtime.rl.tasks.text_warm_start import additions, pretrain_lm, split

KEY = "actor.model.model_path"
EVAL_BATCH = 64  # held-out prompts per greedy generation


def prompt_sets(cfg: TextSection) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """(training rows, held-out rows, where they come from).

    Raises:
        ConfigError: a dataset file that is missing, empty or has a bad line.
    """
    if cfg.dataset is None:
        rows = additions(cfg.num_prompts, cfg.max_operand)
        where = f"built-in additions (< {cfg.max_operand})"
    else:
        rows = load_jsonl(cfg.dataset, "task.dataset")
        where = cfg.dataset
    if cfg.eval_dataset is not None:
        return rows, load_jsonl(cfg.eval_dataset, "task.eval_dataset"), where
    train, held = split(rows, cfg.eval_fraction)
    return train, held, where


def _std_over_ranks(x: torch.Tensor, world: int) -> float:
    """The (unbiased) std of `x` `[n]` over every rank's values, as one process computes it."""
    if world == 1:
        return x.std().item()
    total = reduce_metrics({"n": len(x), "sum": x.double().sum(), "sq": x.double().square().sum()}, "sum")
    n = total["n"]
    return math.sqrt(max(total["sq"] - total["sum"] ** 2 / n, 0.0) / (n - 1)) if n > 1 else float("nan")


class TextTask(Task):
    """Prompts, completions sampled with a KV cache, weighted reward functions."""

    section = TextSection
    shares_sampling_stream = True
    held_out_eval = True
    builtin_prefix: ClassVar[str] = "tiny-lm"

    @classmethod
    def check(cls, run_cfg: RunConfig) -> None:
        if run_cfg.algorithm.name == "ppo":
            raise ConfigError("algorithm.name: ppo is not supported with task.kind: text (no per-token value head "
                              "yet); use algorithm.name: grpo")
        super().check(run_cfg)
        prompt_sets(run_cfg.task)  # dataset errors before the base is loaded or built
        for spec in run_cfg.task.reward:
            load_reward(spec)

    @classmethod
    def builtin_model(cls, run_cfg: RunConfig) -> nn.Module:
        return build_tiny_lm(run_cfg.actor.builtin)

    @classmethod
    def build(cls, run_cfg: RunConfig, model: nn.Module, family: ModelFamily) -> TextTask:
        if not family.generates_text:
            raise ConfigError(f"task.kind: text needs a language model with a tokenizer; the actor is a {family.name}")
        key = KEY if run_cfg.actor.model.model_path is not None else "the built-in language model"
        return cls(run_cfg.task, model, family, family.tokenizer(unwrap_model(model), key))

    def __init__(self, cfg: TextSection, model: nn.Module, family: ModelFamily, tokenizer: Any) -> None:
        self.cfg, self.family, self.tokenizer = cfg, family, tokenizer
        self.train_rows, self.eval_rows, self.source = prompt_sets(cfg)
        self.rewards: list[Reward] = [load_reward(s) for s in cfg.reward]
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(
            getattr(unwrap_model(model), "generation_config", None), "eos_token_id", None)
        if eos is None:
            raise ConfigError(f"{KEY}: the tokenizer has no eos_token; set one (tokenizer.eos_token) so completions end")
        self.eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.action_ids = torch.arange(family.vocab_size(model))  # [V]: every token is an action
        self.context = family.max_context(model)
        self.train_ids = self._encode(self.train_rows, cfg.dataset or "the built-in prompts")
        self.eval_ids = self._encode(self.eval_rows, cfg.eval_dataset or cfg.dataset or "the built-in prompts")
        self.levels = {}
        self.fixed_shapes = False
        self._check_rewards()

    def _encode(self, rows: list[dict[str, Any]], where: str) -> list[list[int]]:
        ids = self.tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]  # one batched call
        for i, p in enumerate(ids):
            if not p:
                raise ConfigError(f"{where}: row {i + 1}: the prompt {rows[i]['prompt']!r} has no tokens")
            if self.context is not None and len(p) + self.cfg.max_new_tokens > self.context:
                raise ConfigError(
                    f"{where}: row {i + 1}: the prompt is {len(p)} tokens; with task.max_new_tokens="
                    f"{self.cfg.max_new_tokens} it exceeds the model's context of {self.context} tokens; "
                    "shorten it or lower task.max_new_tokens")
        return ids

    def _check_rewards(self) -> None:
        """Each reward function once on two rows (empty completions), before any training."""
        rows = self.train_rows[:2]
        total_rewards(self.rewards, [r["prompt"] for r in rows], [""] * len(rows), columns_of(rows))

    def describe(self) -> str:
        names = " + ".join(f"{r.weight:g} * {r.name}" for r in self.rewards)
        return (f"text: {len(self.train_rows)} prompts from {self.source}, {len(self.eval_rows)} held out; "
                f"up to {self.cfg.max_new_tokens} new tokens; reward {names}")

    @property
    def title(self) -> str:
        return f"text ({self.source})"

    def example_inputs(self) -> ModelInputs:
        ids, mask = left_pad(self.train_ids[:2], self.pad_id)
        return ModelInputs(None, None, ids, mask.sum(1), attention_mask=mask)

    def _complete(self, policy: ActorPolicy, rows: list[dict[str, Any]], ids: list[list[int]], group_size: int,
                  generator: torch.Generator | None, share: slice | None = None, total: int = 0, width: int | None = None):
        """Completions of `ids`; under torchrun (`share` of `total` prompts, padded to `width`)
        this rank's share of one rollout."""
        device = policy.action_ids.device
        prompt_ids, prompt_mask = (t.to(device) for t in left_pad(ids, self.pad_id, width))
        rows_of_share = None if share is None else slice(share.start * group_size, share.stop * group_size)
        gen = generate(policy, prompt_ids, prompt_mask, group_size, self.cfg.max_new_tokens, self.eos_ids,
                       self.pad_id, generator, self.cfg.top_p, sync_ranks=share is not None, rows=rows_of_share,
                       total_rows=total * group_size if share is not None else None)
        texts = self.tokenizer.batch_decode([t[m.bool()].tolist() for t, m in zip(gen.tokens.cpu(), gen.mask.cpu(),
                                                                                     strict=True)],
                                            skip_special_tokens=True)
        prompts = [r["prompt"] for r in rows for _ in range(group_size)]
        total, each = total_rewards(self.rewards, prompts, texts, columns_of(rows, group_size))
        return prompt_ids, prompt_mask, gen, texts, total, each

    @torch.no_grad()
    def collect(self, policy: ActorPolicy, num_groups: int, group_size: int, generator: torch.Generator) -> Experience:
        """`num_groups` training prompts drawn from `generator`, `group_size` completions each
        (under torchrun: this rank's `num_groups` of the `num_groups x world size` drawn)."""
        start = time.perf_counter()
        world = get_world_size()
        drawn = torch.randint(len(self.train_rows), (num_groups * world,), generator=generator).tolist()
        share = rank_slice(len(drawn)) if world > 1 else None
        pick = drawn if share is None else drawn[share]
        rows = [self.train_rows[i] for i in pick]
        width = max(len(self.train_ids[i]) for i in drawn)
        prompt_ids, prompt_mask, gen, _, total, each = self._complete(
            policy, rows, [self.train_ids[i] for i in pick], group_size, generator, share, len(drawn), width)
        generate_s = time.perf_counter() - start
        inputs, positions = update_inputs(prompt_ids, prompt_mask, group_size, gen)
        returns = torch.tensor(total)
        stats = {"reward_mean": returns.mean().item(), "reward_std": _std_over_ranks(returns, world),
                 "accuracy": sum(v >= 1.0 for v in each[0]) / len(total),
                 "completion_len": gen.mask.sum(1).mean().item(), "generate_s": generate_s,
                 "completions": len(total)}  # this rank's (summed over ranks in the step's metrics)
        for r, vals in zip(self.rewards, each, strict=True):
            stats[f"reward/{r.name.rpartition(':')[2]}"] = sum(vals) / len(vals)
        n = len(total)
        return Experience(inputs, positions, gen.tokens, gen.logp, stats, n, episode=torch.arange(n),
                          returns=returns, group_size=group_size, mask=gen.mask)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, episodes: int | None, device: torch.device | str = "cpu") -> dict[str, Any]:
        """Greedy answers to the held-out prompts (the first `episodes`, or `task.eval_prompts`,
        or all): mean weighted reward and accuracy (the first reward function >= 1)."""
        n = min(len(self.eval_rows), episodes or self.cfg.eval_prompts or len(self.eval_rows))
        was_training = model.training
        model.eval()
        policy = ActorPolicy(model, self.family, self.action_ids.to(device), 1.0)
        totals, firsts, lengths = [], [], []
        for lo in range(0, n, EVAL_BATCH):
            hi = min(n, lo + EVAL_BATCH)
            _, _, gen, _, total, each = self._complete(policy, self.eval_rows[lo:hi], self.eval_ids[lo:hi], 1, None)
            totals += total
            firsts += each[0]
            lengths += gen.mask.sum(1).tolist()
        model.train(was_training)
        return {"episodes": n, "first_seed": 0, "success_rate": sum(v >= 1.0 for v in firsts) / n,
                "accuracy": sum(v >= 1.0 for v in firsts) / n, "reward_mean": sum(totals) / n,
                "episode_len": sum(lengths) / n}

    def warm_start(self, model: nn.Module, run_cfg: RunConfig, log: Callable[[str], None]) -> dict[str, Any]:
        """Supervised steps on the built-in additions' training part; reports the greedy
        held-out accuracy after it."""
        b, cfg = run_cfg.actor.builtin, run_cfg.task
        rows, _ = split(additions(cfg.num_prompts, cfg.max_operand), cfg.eval_fraction)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(base_seeds(b.seed)[1])
            loss = pretrain_lm(model, self.tokenizer, rows, b.pretrain_steps, b.pretrain_batch_size, b.pretrain_lr,
                               base_seeds(b.seed)[1], log)
        result = self.evaluate(model, None)
        log(f"base warm start: loss {loss:.4f}, held-out accuracy {result['accuracy']:.3f}")
        return {"steps": b.pretrain_steps, "final_loss": loss, "warm_start_accuracy": result["accuracy"],
                "warm_start_reward": result["reward_mean"], "eval_prompts": result["episodes"]}

    def measure_levels(self, base_report: dict[str, Any] | None, base: Callable[[], nn.Module]) -> None:
        """The warm start's held-out accuracy (the built-in base's report), when there is one."""
        report = base_report or {}
        if "warm_start_accuracy" in report:
            self.levels = {"warm_start_accuracy": report["warm_start_accuracy"]}
