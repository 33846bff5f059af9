"""Transformers language models (causal LMs, and vision-language models read as text).

A text-only model reads the observation as words (`ModelInputs.symbol_ids`, one token per
cell or symbol) before the prompt. Folders are loaded with
`AutoModelForCausalLM.from_pretrained(path, local_files_only=True)` (a vision-language model
that is no causal LM, e.g. PaliGemma, with `AutoModelForImageTextToText`): nothing is
downloaded. Saving uses `save_pretrained`.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

import torch
from torch import nn

from lora_runtime._fs import write_json_atomic
from lora_runtime.config import ConfigError
from lora_runtime.rl.models.family import ModelFamily
from lora_runtime.rl.models.inputs import ModelInputs

BUILTIN_TOKENIZER = "lora_runtime_tokenizer"  # attribute of a built-in LM that carries its tokenizer


class LogitsOnly(nn.Module):
    """`model(input_ids).logits` as a module whose output is one tensor (tracing and export
    cannot return transformers' output dataclasses)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class CausalLMFamily(ModelFamily):
    """Any transformers model with `get_output_embeddings()` that takes `input_ids`."""

    name = "transformers language model"
    export_method = "trace"  # transformers models do not script

    def matches(self, model: nn.Module) -> bool:
        return hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None

    def reads_folder(self, config: dict[str, Any]) -> bool:
        return True  # every folder the built-in family does not claim

    def vocab_size(self, model: nn.Module) -> int:
        return model.get_output_embeddings().out_features

    def image_size(self, model: nn.Module) -> int | None:
        return None

    def token_ids(self, inputs: ModelInputs) -> tuple[torch.Tensor, int]:
        """`([N, S + T] view words then prompt, S)`."""
        if inputs.symbol_ids is None:
            return inputs.prompt_ids, 0
        view = inputs.symbol_ids.repeat_interleave(inputs.repeats, dim=0)  # [N, S]
        return torch.cat([view, inputs.prompt_ids], dim=1), view.shape[1]

    def max_context(self, model: nn.Module) -> int | None:
        config = getattr(model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(text, "max_position_embeddings", None)

    def hidden_size(self, model: nn.Module) -> int:
        return model.get_output_embeddings().in_features

    def logits_and_hidden(self, model: nn.Module, inputs: ModelInputs,
                          with_hidden: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids, s = self.token_ids(inputs)
        if inputs.attention_mask is None:
            out = model(input_ids=ids, use_cache=False, output_hidden_states=with_hidden)
        else:  # left-padded prompts (text task): padding masked, positions counted from each row's first token
            mask = inputs.attention_mask
            if s:
                mask = torch.cat([mask.new_ones(mask.shape[0], s), mask], dim=1)
            out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False,
                        output_hidden_states=with_hidden)
        hidden = out.hidden_states[-1][:, s:] if with_hidden else None  # [N, T, D] (after the final norm)
        return out.logits[:, s:], hidden  # [N, T, V]

    generates_text = True

    def decode(self, model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor,
               cache: Any | None) -> tuple[torch.Tensor, Any]:
        """One cached forward: `ids [N, t]` after the `cache`d tokens (None: a prefill).

        Args:
            attention_mask: `[N, cached + t]`, 0 at left padding.

        Returns:
            `(logits [N, V] of the last position, the cache)`.
        """
        t = ids.shape[1]
        out = model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)[:, -t:],
                    use_cache=True, logits_to_keep=1, **{_cache_kwarg(model): cache})
        return out.logits[:, -1], out.past_key_values

    def repeat_cache(self, cache: Any, repeats: int) -> Any:
        """The cache with each row repeated `repeats` times (a group's prompt prefilled once)."""
        cache.batch_repeat_interleave(repeats)
        return cache

    def tokenizer(self, model: nn.Module, key: str) -> Any:
        """The tokenizer saved in the folder `model` was loaded from (`name_or_path`).

        Raises:
            ConfigError: no folder or no loadable tokenizer in it (names `key`).
        """
        if getattr(model, BUILTIN_TOKENIZER, None) is not None:  # a built-in base not saved yet
            return getattr(model, BUILTIN_TOKENIZER)
        from transformers import AutoTokenizer  # deferred: optional dependency

        path = getattr(model, "name_or_path", None)
        if not path or not os.path.isdir(path):
            raise ConfigError(f"{key}: the model was not loaded from a folder, so it has no tokenizer; "
                              "save the tokenizer with the model (tokenizer.save_pretrained)")
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 (transformers raises many types for a missing tokenizer)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{key}={path!r} has no usable tokenizer ({type(exc).__name__}: {first[:200]}); "
                              "save one beside the weights (tokenizer.save_pretrained(folder))") from None
        if isinstance(tok, bool) or not callable(getattr(tok, "encode", None)):
            raise ConfigError(f"{key}={path!r} has no tokenizer (tokenizer.json / tokenizer_config.json)")
        return tok

    def export_call(self, model: nn.Module, inputs: ModelInputs) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        return LogitsOnly(model), (self.token_ids(inputs)[0],)

    def load_folder(self, path: str, config: dict[str, Any], key: str, dtype: torch.dtype | None) -> nn.Module:
        try:
            from transformers import (  # deferred: optional dependency
                AutoModelForCausalLM,
                AutoModelForImageTextToText,
            )
            from transformers.models.auto.modeling_auto import (  # deferred: optional dependency
                MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            )
            from transformers.utils import logging as hf_logging  # deferred: optional dependency

            hf_logging.disable_progress_bar()
        except ImportError:
            raise ConfigError(
                f"{key}={path!r} is a transformers model (model_type={config.get('model_type')!r}) but "
                "transformers is not installed; install it with pip install 'lora-runtime[hf]'"
            ) from None
        causal = config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        auto_class = AutoModelForCausalLM if causal else AutoModelForImageTextToText
        try:
            return auto_class.from_pretrained(path, local_files_only=True, dtype=dtype or "auto")
        except Exception as exc:  # noqa: BLE001 (transformers raises many types for unusable folders)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"{key}={path!r}: transformers could not load it as a causal language model "
                f"({type(exc).__name__}: {first}); point {key} at a causal LM checkpoint or the built-in actor"
            ) from None

    def save_weights(self, model: nn.Module, folder: str, extra_config: dict[str, Any]) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer = getattr(model, BUILTIN_TOKENIZER, None)  # a built-in base's own tokenizer (tiny_lm)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if "pretrain" in extra_config:  # a built-in base: its warm-start report, as the VLA's folder keeps it
            path = os.path.join(folder, "config.json")
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
            write_json_atomic(path, {**config, "pretrain": extra_config["pretrain"]})


def _cache_kwarg(model: nn.Module) -> str:
    """The name `forward` takes the KV cache by: `cache` (transformers >= 5.2x), else
    `past_key_values`."""
    params = inspect.signature(getattr(model, "_orig_mod", model).forward).parameters  # through torch.compile
    return "cache" if "cache" in params else "past_key_values"


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """`[N, T]` positions counted from each row's first unmasked token (0 on left padding),
    as transformers' `generate` counts them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
