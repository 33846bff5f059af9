"""Bring-your-own-model: transformers checkpoints built from configs and saved to folders.

Tied embeddings (Qwen2, `tie_word_embeddings=True`) through merge_lora / merged /
iter_merged_weights / a saved merged folder; bf16 bases with float32 adapters; complete
merged and full-mode folders; `adapter_config.json` that PEFT's auto class loads.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from support.hf_folders import CHAT_TEMPLATE, causal_lm_folder, logits, patched, token_batch

from lora_runtime.actor import prepare_actor
from lora_runtime.adapters import (
    iter_lora_layers,
    iter_merged_weights,
    merge_lora,
    merged,
    save_adapter,
)
from lora_runtime.config import ActorModelConfig
from lora_runtime.rl.models import load_model_folder, save_model_folder

transformers = pytest.importorskip("transformers", reason="the hf tests need transformers (test extra)")


@pytest.fixture(scope="module")
def qwen_tied(tmp_path_factory) -> str:
    return causal_lm_folder(str(tmp_path_factory.mktemp("qwen2") / "base"), "qwen2", tie=True)


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory) -> str:
    return causal_lm_folder(str(tmp_path_factory.mktemp("llama") / "base"), "llama", dtype=torch.bfloat16)


def _float64_reference(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the unmerged model (LoRA path) computed in float64."""
    return logits(copy.deepcopy(model).double(), ids)


def _json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    err = (actual.double() - expected.double()).abs().max() / expected.abs().max()
    assert err < rel, f"relative error {err:.3g} >= {rel}"


def _safetensors_dtypes(folder: str, name: str) -> dict[str, torch.dtype]:
    with safe_open(os.path.join(folder, name), "pt") as f:
        return {k: f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


# ----------------------------------------------------------------------------- tied embeddings


def test_tied_model_targets_lm_head_and_trains(qwen_tied):
    model = patched(load_model_folder(qwen_tied))
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight  # still tied
    ids = token_batch()
    model(input_ids=ids, use_cache=False).logits.float().pow(2).mean().backward()
    assert model.lm_head.lora_B.weight.grad.abs().sum() > 0


def test_merge_lora_unties_lm_head_and_keeps_the_embedding(qwen_tied):
    model = patched(load_model_folder(qwen_tied))
    ids = token_batch()
    expected = _float64_reference(model, ids)
    embed_before = model.model.embed_tokens.weight.detach().clone()
    merge_lora(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embed_before)  # the input side keeps W
    assert not torch.equal(model.lm_head.weight, embed_before)  # the head got W + BA
    assert model.config.tie_word_embeddings is False
    _close(logits(model, ids), expected, 1e-5)


def test_merged_unties_for_the_block_and_ties_again(qwen_tied):
    model = patched(load_model_folder(qwen_tied))
    ids = token_batch()
    expected = _float64_reference(model, ids)
    shared = model.model.embed_tokens.weight
    bits_before = shared.detach().clone()
    with merged(model) as stats:
        assert model.lm_head.base_layer.weight is not shared
        assert torch.equal(shared, bits_before)  # the embedding is not touched
        _close(logits(model, ids), expected, 1e-5)
    assert stats.untied_bytes == shared.numel() * shared.element_size()
    assert model.lm_head.base_layer.weight is shared  # the tie is back, same object
    assert torch.equal(shared, bits_before)
    _close(logits(model, ids), expected, 1e-5)


def test_iter_merged_weights_of_a_tied_model_yields_both_names(qwen_tied):
    model = patched(load_model_folder(qwen_tied))
    base = model.model.embed_tokens.weight.detach().clone()
    got = list(iter_merged_weights(model))
    want = list(merge_lora(copy.deepcopy(model)).state_dict().items())
    assert [k for k, _ in got] == [k for k, _ in want]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, want))
    weights = dict(got)
    assert torch.equal(weights["model.embed_tokens.weight"], base)
    assert not torch.equal(weights["lm_head.weight"], base)
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight  # model untouched


def test_tied_merged_folder_has_both_tensors_and_reloads_with_equal_logits(qwen_tied, tmp_path):
    model = patched(load_model_folder(qwen_tied))
    ids = token_batch()
    expected = _float64_reference(model, ids)
    merge_lora(model)
    out = str(tmp_path / "merged")
    save_model_folder(model, out)
    config = _json(os.path.join(out, "config.json"))
    assert config["tie_word_embeddings"] is False
    keys = _safetensors_dtypes(out, "model.safetensors")
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(keys)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    _close(logits(reloaded, ids), expected, 1e-5)


# ----------------------------------------------------------------------------- dtype


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_bf16_checkpoint_loads_in_bf16_with_float32_adapters(llama_bf16):
    base = load_model_folder(llama_bf16)  # dtype auto: the checkpoint's bfloat16
    as_f32 = load_model_folder(llama_bf16, dtype="float32")
    assert {p.dtype for p in base.parameters()} == {torch.bfloat16}
    assert _param_bytes(base) * 2 == _param_bytes(as_f32)
    cfg = ActorModelConfig(is_lora=True, lora_rank=4)
    model = prepare_actor(base, cfg)
    layers = list(iter_lora_layers(model))
    assert {layer.base_layer.weight.dtype for _, layer in layers} == {torch.bfloat16}
    assert {layer.lora_A.weight.dtype for _, layer in layers} == {torch.float32}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    out = model(input_ids=token_batch(), use_cache=False).logits
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)


def test_bf16_outputs_keep_their_dtypes(llama_bf16, tmp_path):
    model = patched(load_model_folder(llama_bf16))
    save_adapter(model, tmp_path / "adapter")
    adapter = _safetensors_dtypes(str(tmp_path / "adapter"), "adapter_model.safetensors")
    assert set(adapter.values()) == {torch.bfloat16}  # adapter_dtype not applied: the layer's own
    merge_lora(model)
    save_model_folder(model, str(tmp_path / "merged"))
    assert set(_safetensors_dtypes(str(tmp_path / "merged"), "model.safetensors").values()) == {torch.bfloat16}
    config = _json(tmp_path / "merged" / "config.json")
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    size = os.path.getsize(tmp_path / "merged" / "model.safetensors")
    assert size < 1.1 * os.path.getsize(os.path.join(llama_bf16, "model.safetensors"))


def test_adapter_dtype_float32_is_saved_as_float32_and_resumes_exactly(llama_bf16, tmp_path):
    cfg = ActorModelConfig(is_lora=True, lora_rank=4)
    model = prepare_actor(load_model_folder(llama_bf16), cfg)
    with torch.no_grad():
        for _, layer in iter_lora_layers(model):
            layer.lora_B.weight.normal_(std=0.05)
    save_adapter(model, tmp_path / "adapter")
    assert set(_safetensors_dtypes(str(tmp_path / "adapter"), "adapter_model.safetensors").values()) == {torch.float32}
    resumed = prepare_actor(load_model_folder(llama_bf16), cfg.model_copy(update={"lora_path": str(tmp_path / "adapter")}))
    for (_, a), (_, b) in zip(iter_lora_layers(model), iter_lora_layers(resumed)):
        assert b.lora_B.weight.dtype == torch.float32 and torch.equal(a.lora_B.weight, b.lora_B.weight)


# ----------------------------------------------------------------------------- complete folders


def test_merged_folder_is_complete_and_loads_with_the_auto_classes(llama_bf16, tmp_path):
    model = patched(load_model_folder(llama_bf16, dtype="float32"))
    ids = token_batch()
    expected = _float64_reference(model, ids)
    merge_lora(model)
    out = str(tmp_path / "merged")
    save_model_folder(model, out)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.apply_chat_template([{"role": "user", "content": "w1 w2"}], tokenize=False) == "<user> w1 w2 "
    assert tok("w1 w2")["input_ids"][-2:] == [5, 6]
    gen = transformers.GenerationConfig.from_pretrained(out, local_files_only=True)
    assert gen.max_new_tokens == 7
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    _close(logits(reloaded, ids), expected, 1e-5)


def test_full_mode_folder_is_complete(llama_bf16, tmp_path):
    model = prepare_actor(load_model_folder(llama_bf16), ActorModelConfig(is_lora=False))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    save_model_folder(model, str(tmp_path / "model"))
    names = set(os.listdir(tmp_path / "model"))
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    assert set(_safetensors_dtypes(str(tmp_path / "model"), "model.safetensors").values()) == {torch.bfloat16}


# PEFT warns that the tied lm_head is adapted without `ensure_weight_tying`: meant, our adapter
# adapts lm_head alone (the embedding stays as it is; merging unties the head).
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
def test_auto_peft_model_loads_our_adapter(qwen_tied, tmp_path):
    peft = pytest.importorskip("peft", reason="needs peft (test extra)")
    model = patched(load_model_folder(qwen_tied))
    ids = token_batch()
    ours = logits(model, ids)
    save_adapter(model, tmp_path / "adapter")
    cfg = _json(tmp_path / "adapter" / "adapter_config.json")
    assert cfg["base_model_name_or_path"] == qwen_tied
    assert cfg["task_type"] == "CAUSAL_LM"
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"), local_files_only=True)
    _close(logits(theirs, ids), ours, 1e-5)


# ----------------------------------------------------------------------------- a vision-language model


def test_llava_merged_folder_with_processor_reloads_with_equal_logits(tmp_path):
    from support.hf_folders import IMAGE_SIZE, IMAGE_TOKEN, llava_folder

    base = llava_folder(str(tmp_path / "base"))
    model = patched(load_model_folder(base))
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    paths = [p for p, _ in iter_lora_layers(model)]
    assert "lm_head" in paths and any("vision_tower" in p for p in paths)
    ids = torch.cat([torch.full((2, 4), IMAGE_TOKEN), token_batch(length=5)], dim=1)  # [2, 4 image + 5 text]
    pixels = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5))

    def run(m, dtype):
        with torch.no_grad():
            return m(input_ids=ids, pixel_values=pixels.to(dtype), use_cache=False).logits

    expected = run(copy.deepcopy(model).double(), torch.float64)
    merge_lora(model)
    out = str(tmp_path / "merged")
    save_model_folder(model, out)
    assert {"processor_config.json", "tokenizer.json", "chat_template.jinja"} <= set(os.listdir(out))
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(out, local_files_only=True)
    _close(run(reloaded, torch.float32), expected, 1e-5)
    processor = transformers.AutoProcessor.from_pretrained(out, local_files_only=True)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
