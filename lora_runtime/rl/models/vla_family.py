"""The built-in VLA's family: it reads images and prompts; its folders need no transformers."""

from __future__ import annotations

import os
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lora_runtime._fs import write_json_atomic
from lora_runtime.adapters import unwrap_model
from lora_runtime.config import BuiltinActorConfig, ConfigError
from lora_runtime.rl.models.family import ModelFamily
from lora_runtime.rl.models.folders import CONFIG_NAME, WEIGHTS_NAME
from lora_runtime.rl.models.inputs import ModelInputs
from lora_runtime.rl.models.vla import MODEL_TYPE, TinyVLA


def _inner(model: nn.Module) -> TinyVLA:
    return unwrap_model(model)


class VLAFamily(ModelFamily):
    """`TinyVLA`: images through its vision encoder, prompts through its decoder."""

    name = "built-in VLA"
    export_method = "script"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, TinyVLA)

    def reads_folder(self, config: dict[str, Any]) -> bool:
        """True for a folder whose `config.json` names the built-in actor."""
        return config.get("model_type") == MODEL_TYPE

    def vocab_size(self, model: nn.Module) -> int:
        return model.config.vocab_size

    def image_size(self, model: nn.Module) -> int | None:
        return model.config.image_size

    def max_prompt_len(self, model: nn.Module) -> int | None:
        return _inner(model).config.max_text_len

    def hidden_size(self, model: nn.Module) -> int:
        return _inner(model).config.text_dim

    def logits_and_hidden(self, model: nn.Module, inputs: ModelInputs,
                          with_hidden: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        pixels = inputs.pixels
        if pixels.dtype == torch.uint8:
            pixels = pixels.float() / 255.0  # [B, 3, H, W] in [0, 1]
        if not with_hidden:
            return model(pixels, inputs.prompt_ids, inputs.repeats), None  # [N, T, V]
        both = model(pixels, inputs.prompt_ids, inputs.repeats, with_hidden=True)  # [N, T, V + D]
        vocab = both.shape[-1] - self.hidden_size(_inner(model))
        return both[..., :vocab], both[..., vocab:]

    def export_call(self, model: nn.Module, inputs: ModelInputs) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        pixels = inputs.pixels if inputs.pixels.dtype != torch.uint8 else inputs.pixels.float() / 255.0
        return model, (pixels.repeat_interleave(inputs.repeats, dim=0), inputs.prompt_ids)

    def load_folder(self, path: str, config: dict[str, Any], key: str, dtype: torch.dtype | None) -> nn.Module:
        """The built-in actor of a folder, its weights checked against its sizes."""
        cfg_path = os.path.join(path, CONFIG_NAME)
        try:
            sizes = BuiltinActorConfig.model_validate(config.get("builtin", {}))
        except ValidationError as exc:
            raise ConfigError(f"{cfg_path}: the 'builtin' sizes are invalid: {exc}") from None
        weights = os.path.join(path, WEIGHTS_NAME)
        try:
            state = load_file(weights)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"{weights}: cannot read the weights ({exc}); {key} must hold {WEIGHTS_NAME}") from None
        model = TinyVLA(sizes)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
        if missing or unexpected or shapes:
            raise ConfigError(
                f"{weights}: does not fit the sizes in {cfg_path}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, wrong shapes {sorted(shapes)[:5]}"
            )
        model.load_state_dict({k: v.float() for k, v in state.items()})
        model.name_or_path = path  # as transformers models carry it (adapter_config.json names it)
        return model.to(dtype or torch.float32)

    def save_weights(self, model: nn.Module, folder: str, extra_config: dict[str, Any]) -> None:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
        config = builtin_config_json(model.config, **extra_config)
        config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        write_json_atomic(os.path.join(folder, CONFIG_NAME), config)


def builtin_config_json(sizes: BuiltinActorConfig, **extra: Any) -> dict[str, Any]:
    """The `config.json` of a built-in actor folder."""
    return {
        "model_type": MODEL_TYPE,
        "architectures": [TinyVLA.__name__],
        "torch_dtype": "float32",
        "builtin": sizes.model_dump(),
        **extra,
    }


