"""The recipe of docs/trl.md: TRL's `GRPOTrainer` on a model patched by `prepare_actor`
(no `peft_config`), the KL reference through `adapter_disabled`, a PEFT adapter saved at
the end. Skipped when `trl` is not installed (it is never a dependency of the runtime)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lora_runtime.actor import prepare_actor
from lora_runtime.adapters import adapter_disabled, save_adapter
from lora_runtime.config import ActorModelConfig
from lora_runtime.rl.models.tiny_lm import char_tokenizer

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- the shim of docs/trl.md (user code: TRL stays out of the runtime) ----------------------


class AdapterDisabledReference(nn.Module):
    """TRL's `ref_model`: the policy itself with its adapters switched off (no copy)."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.__dict__["policy"] = policy  # not a submodule: no second set of parameters

    def forward(self, *args, **kwargs):
        with adapter_disabled(self.policy):
            return self.policy(*args, **kwargs)


class RuntimeGRPOTrainer(trl.GRPOTrainer):
    """`GRPOTrainer` for a model patched by `prepare_actor`: TRL sees a plain transformers
    model whose only trainable parameters are the adapters; with `beta != 0` its reference
    is the same model under `adapter_disabled` instead of a second copy loaded from disk."""

    def __init__(self, *args, **kwargs):
        grpo_args = kwargs.pop("args")
        beta = grpo_args.beta
        grpo_args.beta = 0.0  # TRL would load a full second model as the reference
        super().__init__(*args, args=grpo_args, **kwargs)
        grpo_args.beta = self.beta = beta
        if beta != 0.0:
            self.ref_model = AdapterDisabledReference(self.model)


# --- the test -----------------------------------------------------------------------------


def exact(prompts, completions, answer, **kw):
    return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]


def digits(prompts, completions, **kw):
    """A shaped reward a random model already sees differences in: the share of digits."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def test_trl_trains_a_prepare_actor_model_with_the_reference_through_adapter_disabled(tmp_path):
    tok = char_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", local_files_only=True)
    model = prepare_actor(model, ActorModelConfig(is_lora=True, lora_rank=4, target_modules=SEVEN), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(6) for b in range(6)]
    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to="none",
                          per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
                          learning_rate=1e-2, max_steps=3, beta=0.04, gradient_checkpointing=False,
                          save_strategy="no", logging_steps=1, seed=0, lr_scheduler_type="constant")
    trainer = RuntimeGRPOTrainer(model=model, reward_funcs=[exact, digits], args=args,
                                 train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    assert isinstance(trainer.ref_model, AdapterDisabledReference) and trainer.beta == 0.04
    trainer.train()
    logged = [h for h in trainer.state.log_history if "kl" in h]
    assert logged and all(torch.isfinite(torch.tensor(float(h["kl"]))) for h in logged)
    assert float(logged[-1]["kl"]) > 0  # the adapters moved away from the reference
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)  # only the adapters moved
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if not p.requires_grad)

    save_adapter(model, tmp_path / "adapter")  # a PEFT adapter: PEFT loads it onto the base
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    ids = torch.tensor([tok.encode("3+4=", add_special_tokens=False)])
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                            tmp_path / "adapter").eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
