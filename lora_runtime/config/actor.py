"""The `actor` section: the mode and adapter (`actor.model`) and the built-in actor's sizes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool, StrictInt, field_validator, model_validator

from lora_runtime.config.base import Strict, not_blank

Mode = Literal["new", "resume", "full"]


class ActorModelConfig(Strict):
    """The `actor.model` section: which mode to train in and how the adapter looks.

    `mode` is "new" (`is_lora: true`, no `lora_path`), "resume" (`is_lora: true` with a
    `lora_path`) or "full" (`is_lora: false`; `lora_rank` is ignored).

    `target_modules: null` (the default) takes the adapter layer's default targets
    (`lora_runtime.adapters.DEFAULT_TARGETS`, RLinf's list).

    `dtype` is the base model's dtype ("auto": the checkpoint's own; the built-in actor is
    float32); full mode trains in it. `adapter_dtype` is the adapters' dtype (and so their
    optimizer state's); the op computes in the base dtype.
    """

    is_lora: StrictBool
    lora_rank: StrictInt = Field(32, ge=1)
    lora_path: str | None = None
    model_path: str | None = None
    lora_alpha: float | None = Field(None, gt=0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(None, min_length=1)
    exclude_modules: list[str] = Field(default_factory=list)
    init_lora_weights: Literal["gaussian", "kaiming"] = "gaussian"
    use_rslora: StrictBool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    adapter_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Run LoRA layers that read one input (q/k/v, gate/up) as one grouped op; off for ablation.
    group_siblings: StrictBool = True

    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _names_not_blank(cls, names: list[str] | None) -> list[str] | None:
        for name in names or ():
            if not name.strip() or name != name.strip() or name.startswith(".") or name.endswith("."):
                raise ValueError(
                    f"module name {name!r} is not a dotted module name such as 'q_proj' or 'attn.proj'"
                )
        return names

    _path_not_blank = field_validator("lora_path", "model_path")(not_blank)

    @model_validator(mode="after")
    def _lora_path_needs_lora(self) -> ActorModelConfig:
        if not self.is_lora and self.lora_path is not None:
            raise ValueError(
                f"is_lora is false (full fine-tuning) but lora_path={self.lora_path!r} is set: "
                "the adapter would be ignored. Set is_lora: true to resume it, or lora_path: null"
            )
        return self

    @property
    def mode(self) -> Mode:
        """"new", "resume" or "full"."""
        if not self.is_lora:
            return "full"
        return "new" if self.lora_path is None else "resume"


class BuiltinActorConfig(Strict):
    """The `actor.builtin` section: the built-in vision-language-action actor.

    Used when `actor.model.model_path` is null. The base weights are deterministic: `seed`
    draws the initial weights, then `pretrain_steps` supervised steps of the task's warm
    start (see `lora_runtime.rl.tasks`) teach the base what the task needs before RL.
    """

    image_size: StrictInt = Field(16, ge=4)
    patch_size: StrictInt = Field(4, ge=1)
    vision_dim: StrictInt = Field(64, ge=8)
    vision_layers: StrictInt = Field(2, ge=1)
    vision_heads: StrictInt = Field(4, ge=1)
    vision_mlp_dim: StrictInt = Field(128, ge=8)
    pool_latents: StrictInt = Field(1, ge=1)
    text_dim: StrictInt = Field(64, ge=8)
    text_layers: StrictInt = Field(3, ge=1)
    text_heads: StrictInt = Field(4, ge=1)
    text_mlp_dim: StrictInt = Field(128, ge=8)
    vocab_size: StrictInt = Field(32, ge=4)
    max_text_len: StrictInt = Field(16, ge=2)
    seed: StrictInt = 0
    pretrain_steps: StrictInt = Field(600, ge=0)
    pretrain_batch_size: StrictInt = Field(128, ge=1)
    pretrain_lr: float = Field(3e-3, gt=0.0)

    @model_validator(mode="after")
    def _shapes_fit(self) -> BuiltinActorConfig:
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        for dim, heads in (("vision_dim", "vision_heads"), ("text_dim", "text_heads")):
            if getattr(self, dim) % getattr(self, heads):
                problems.append(f"{dim}={getattr(self, dim)} is not a multiple of {heads}={getattr(self, heads)}")
        if self.text_dim % self.text_heads == 0 and (self.text_dim // self.text_heads) % 2:
            problems.append(f"text_dim / text_heads = {self.text_dim // self.text_heads} must be even (rotary embedding)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ActorConfig(Strict):
    """The `actor` section: `model` (mode and adapter) and `builtin` (built-in actor sizes)."""

    model: ActorModelConfig
    builtin: BuiltinActorConfig = Field(default_factory=BuiltinActorConfig)
