"""Model families: how one kind of model reads `ModelInputs` and what it needs around it.

A family object is the one place that knows a model class: the trainer, the tasks and the
CLI ask `family_of(model)` and never test the model's type themselves. Families know
nothing of LoRA (the runtime patches any of them from outside).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from lora_runtime.rl.models.inputs import ModelInputs


class ModelFamily:
    """The interface each family implements (see `vla.VLAFamily`, `causal_lm.CausalLMFamily`)."""

    name = "model"
    export_method: Literal["script", "trace"] = "trace"
    generates_text = False  # a language model with a tokenizer and cached decoding (`decode`, `tokenizer`)

    def matches(self, model: nn.Module) -> bool:
        """True when `model` (unwrapped) belongs to this family."""
        raise NotImplementedError

    def vocab_size(self, model: nn.Module) -> int:
        """The size of the output vocabulary (the action tokens are its last ids)."""
        raise NotImplementedError

    def image_size(self, model: nn.Module) -> int | None:
        """The side of the images the model reads, or None when it reads words only."""
        raise NotImplementedError

    def logits(self, model: nn.Module, inputs: ModelInputs) -> torch.Tensor:
        """`[N, T, vocab]` next-token logits at the prompt positions of `inputs`."""
        return self.logits_and_hidden(model, inputs, False)[0]

    def logits_and_hidden(self, model: nn.Module, inputs: ModelInputs,
                          with_hidden: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(logits [N, T, vocab], hidden [N, T, D] or None)`: the last hidden state is the
        output layer's input (what a value head reads), from the same forward."""
        raise NotImplementedError

    def max_prompt_len(self, model: nn.Module) -> int | None:
        """The longest prompt the model reads (prompts padded to it keep shapes fixed), or None."""
        return None

    def max_context(self, model: nn.Module) -> int | None:
        """The most tokens (prompt + completion) the model reads, or None when unknown."""
        return None

    def hidden_size(self, model: nn.Module) -> int:
        """`D`, the width of the last hidden state."""
        raise NotImplementedError

    def export_call(self, model: nn.Module, inputs: ModelInputs) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        """A module whose forward takes plain tensors, and those tensors, for TorchScript/AOTI."""
        raise NotImplementedError

    def save_weights(self, model: nn.Module, folder: str, extra_config: dict[str, Any]) -> None:
        """Writes `model`'s `config.json` and weights into the (staging) `folder`."""
        raise NotImplementedError
