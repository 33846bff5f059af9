"""Validated run configuration: the `actor.model` section and the whole YAML file.

The config holds values only (no tensors, no models): it can be validated, printed and
diffed without building anything.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from lora_runtime.errors import ConfigError

# The modules RLinf adapts by default, matched on the last dotted component(s) of a name.
DEFAULT_TARGETS: tuple[str, ...] = (
    "proj", "qkv", "fc1", "fc2", "q", "kv", "fc3", "q_proj", "k_proj", "v_proj", "o_proj",
    "gate_proj", "up_proj", "down_proj", "lm_head",
)

Mode = Literal["new", "resume", "full"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ActorModelConfig(_Strict):
    """The `actor.model` section: which mode to train in and how the adapter looks.

    `mode` is "new" (`is_lora: true`, no `lora_path`), "resume" (`is_lora: true` with a
    `lora_path`) or "full" (`is_lora: false`; `lora_rank` is ignored).

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
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1)
    exclude_modules: list[str] = Field(default_factory=list)
    init_lora_weights: Literal["gaussian", "kaiming"] = "gaussian"
    use_rslora: StrictBool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    adapter_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Run LoRA layers that read one input (q/k/v, gate/up) as one grouped op; off for ablation.
    group_siblings: StrictBool = True

    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _names_not_blank(cls, names: list[str]) -> list[str]:
        for name in names:
            if not name.strip() or name != name.strip() or name.startswith(".") or name.endswith("."):
                raise ValueError(
                    f"module name {name!r} is not a dotted module name such as 'q_proj' or 'attn.proj'"
                )
        return names

    @field_validator("lora_path", "model_path")
    @classmethod
    def _path_not_blank(cls, path: str | None) -> str | None:
        if path is not None and not path.strip():
            raise ValueError("an empty path is not allowed; use null for none")
        return path

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


class BuiltinActorConfig(_Strict):
    """The `actor.builtin` section: the built-in vision-language-action actor.

    Used when `actor.model.model_path` is null. The base weights are deterministic: `seed`
    draws the initial weights, then `pretrain_steps` supervised steps teach the base to
    answer "where is <colour>?" in number words (see `lora_runtime.rl.pretrain`); it never
    sees the action tokens as answers, so RL starts at chance reward.
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


class ActorConfig(_Strict):
    """The `actor` section: `model` (mode and adapter) and `builtin` (built-in actor sizes)."""

    model: ActorModelConfig
    builtin: BuiltinActorConfig = Field(default_factory=BuiltinActorConfig)


TaskKind = Literal["reach", "babyai", "gym"]


class TaskConfig(_Strict):
    """The `task` section: what the actor is trained on.

    `kind: reach` (default): the synthetic one-step reach task (see
    `lora_runtime.rl.tasks.reach`). A `grid x grid` scene holds `num_objects` objects of
    different colours (out of `num_colors`); the instruction names one colour; the action
    tokens (row, column) must point at its cell. Reward 1 on the cell, else 0; chance is
    `1 / grid**2`.

    `kind: babyai`: multi-step episodes of the BabyAI / MiniGrid level `env_id` (Farama's
    `minigrid`), `num_envs` environments stepped together (see `lora_runtime.rl.tasks.babyai`).
    `kind: gym`: your own gymnasium environment from `entry` ("package.module:function", see
    `lora_runtime.rl.tasks.gym_entry`).
    """

    kind: TaskKind = "reach"
    grid: StrictInt = Field(4, ge=2, le=16)
    num_objects: StrictInt = Field(3, ge=1)
    num_colors: StrictInt = Field(4, ge=1, le=8)
    noise: float = Field(0.05, ge=0.0, le=1.0)
    env_id: str = "BabyAI-GoToObj-v0"
    entry: str | None = None
    num_envs: StrictInt = Field(16, ge=1, le=1024)
    max_episode_steps: StrictInt | None = Field(None, ge=1)
    bc_episodes: StrictInt = Field(400, ge=1)
    eval_episodes: StrictInt = Field(200, ge=1)
    prev_action: StrictBool = False  # multi-step tasks: the prompt ends with the previous action's token

    @field_validator("entry")
    @classmethod
    def _entry_form(cls, entry: str | None) -> str | None:
        if entry is not None and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", entry) is None:
            raise ValueError("expected 'package.module:function', e.g. 'my_envs.cartpole:make_env'")
        return entry

    @model_validator(mode="after")
    def _objects_fit(self) -> TaskConfig:
        if self.num_objects > self.num_colors:
            raise ValueError(
                f"num_objects={self.num_objects} > num_colors={self.num_colors}: "
                "every object needs its own colour"
            )
        if self.num_objects > self.grid * self.grid:
            raise ValueError(f"num_objects={self.num_objects} does not fit a {self.grid}x{self.grid} grid")
        if self.kind == "gym" and self.entry is None:
            raise ValueError("kind 'gym' needs task.entry: 'package.module:function' returning (env, adapter)")
        if self.kind == "reach" and self.prev_action:
            raise ValueError("task.prev_action is for multi-step tasks (kind: babyai or gym); the reach task is one step")
        if self.kind != "gym" and self.entry is not None:
            raise ValueError(f"task.entry={self.entry!r} is only read with kind: gym (kind is {self.kind!r})")
        return self

    def base_recipe(self) -> dict[str, Any]:
        """The keys the built-in base (warm start) depends on; RL-only keys are left out."""
        if self.kind == "reach":
            return {"grid": self.grid, "num_objects": self.num_objects, "num_colors": self.num_colors, "noise": self.noise}
        recipe = {"kind": self.kind, "env_id": self.env_id, "entry": self.entry, "bc_episodes": self.bc_episodes,
                  "max_episode_steps": self.max_episode_steps}
        return {**recipe, "prev_action": True} if self.prev_action else recipe  # older bases keep their hash


class TrainerConfig(_Strict):
    """The `trainer` section: the GRPO loop and where its outputs go."""

    output_dir: str = "runs/run"
    overwrite: StrictBool = False
    steps: StrictInt = Field(60, ge=1)
    batch_size: StrictInt = Field(16, ge=1)
    group_size: StrictInt = Field(8, ge=2)
    lr: float = Field(3e-3, gt=0.0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    clip_eps: float = Field(0.2, gt=0.0)
    kl_coef: float = Field(0.0, ge=0.0)
    update_epochs: StrictInt = Field(1, ge=1)
    minibatches: StrictInt = Field(1, ge=1)  # optimizer steps per epoch (multi-step tasks), PPO-style
    max_grad_norm: float = Field(1.0, gt=0.0)
    temperature: float = Field(1.0, gt=0.0)
    seed: StrictInt = 0
    compile: StrictBool = False
    device: str = "cpu"
    num_threads: StrictInt | None = Field(None, ge=1)
    distributed: Literal["none", "fsdp", "ddp"] = "none"
    save_every: StrictInt = Field(0, ge=0)
    resume_train_state: StrictBool = True
    base_dir: str | None = None
    progress: StrictBool = True
    plot: StrictBool = True

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        kind, _, index = device.partition(":")
        if kind not in ("cpu", "cuda", "auto") or (index and not index.isdigit()) or (index and kind != "cuda"):
            raise ValueError("allowed: 'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available)")
        return device

    @field_validator("output_dir", "base_dir")
    @classmethod
    def _dir_not_blank(cls, path: str | None) -> str | None:
        if path is not None and not path.strip():
            raise ValueError("an empty path is not allowed")
        return path


class RunConfig(_Strict):
    """A whole run file: `actor` (model + built-in sizes), `task` and `trainer`."""

    actor: ActorConfig
    task: TaskConfig = Field(default_factory=TaskConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)

    @model_validator(mode="after")
    def _minibatches_need_episodes(self) -> RunConfig:
        if self.trainer.minibatches > 1 and self.task.kind == "reach":
            raise ValueError(f"trainer.minibatches={self.trainer.minibatches} needs a multi-step task (task.kind: babyai "
                             "or gym); the reach task takes one update over the whole batch: use trainer.minibatches: 1")
        return self


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        parent = _model_at(model, error["loc"][:-1])
        allowed = sorted(parent.model_fields) if parent is not None else []
        key = str(error["loc"][-1])
        hint = difflib.get_close_matches(key, allowed, n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
        return f"{loc}: unknown key (allowed: {', '.join(allowed)}){suggestion}"
    if error["type"] == "missing":
        return f"{loc}: required key is missing"
    value = error.get("input")
    msg = str(error.get("ctx", {}).get("error", error["msg"]))
    if isinstance(value, dict):  # a rule across several keys of a section (or sections: no prefix)
        return f"{loc}: {msg}" if loc else msg
    return f"{loc}: got {value!r}: {msg}"


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return None
        current = field.annotation
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def validate_config(raw: Any, source: str = "<config>") -> RunConfig:
    """Validates a parsed YAML document.

    Args:
        raw: the parsed document (a mapping).
        source: where it came from, used in error messages.

    Returns:
        The validated `RunConfig`.

    Raises:
        ConfigError: every problem found, one per line, each with its dotted key.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the file must hold a mapping with an 'actor' section, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, RunConfig) for e in exc.errors()]
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(lines)) from None


def set_dotted(raw: dict[str, Any], assignment: str) -> None:
    """Applies one `dotted.key=value` override to a parsed document (value parsed as YAML).

    Raises:
        ConfigError: the assignment has no '=' or walks through a non-mapping.
    """
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value, e.g. actor.model.lora_rank=16")
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML ({exc})") from None


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Reads and validates a YAML run file.

    Args:
        path: the YAML file.
        overrides: `dotted.key=value` strings applied before validation (the CLI's `--set`).

    Returns:
        The validated `RunConfig`.

    Raises:
        ConfigError: a missing or unreadable file, bad YAML, or invalid values; the message
            names the file, the dotted key, the bad value and what is allowed.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a YAML file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None
    if raw is None:
        raise ConfigError(f"{path}: the file is empty; it needs an actor.model section")
    if overrides and isinstance(raw, dict):
        for assignment in overrides:
            set_dotted(raw, assignment)
        path = f"{path} (with --set {' '.join(overrides)})"
    return validate_config(raw, source=path)
