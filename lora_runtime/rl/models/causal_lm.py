"""Transformers language models (causal LMs, and vision-language models read as text).

A text-only model reads the observation as words (`ModelInputs.symbol_ids`, one token per
cell or symbol) before the prompt. Folders are loaded with
`AutoModelForCausalLM.from_pretrained(path, local_files_only=True)` (a vision-language model
that is no causal LM, e.g. PaliGemma, with `AutoModelForImageTextToText`): nothing is
downloaded. Saving uses `save_pretrained`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lora_runtime.config import ConfigError
from lora_runtime.rl.models.family import ModelFamily
from lora_runtime.rl.models.inputs import ModelInputs


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

    def hidden_size(self, model: nn.Module) -> int:
        return model.get_output_embeddings().in_features

    def logits_and_hidden(self, model: nn.Module, inputs: ModelInputs,
                          with_hidden: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids, s = self.token_ids(inputs)
        out = model(input_ids=ids, use_cache=False, output_hidden_states=with_hidden)
        hidden = out.hidden_states[-1][:, s:] if with_hidden else None  # [N, T, D] (after the final norm)
        return out.logits[:, s:], hidden  # [N, T, V]

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
