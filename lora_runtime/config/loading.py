"""The whole run file: `actor`, `task`, `algorithm` and `runner`; reading and validating it.

`load_config(path, overrides)` reads a YAML file, applies `--set dotted.key=value`
overrides and validates every section; each problem is reported with its dotted key, the
bad value and what is allowed. A key of the old `trainer` section names its new place.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

import yaml
from pydantic import BaseModel, Field, SerializeAsAny, ValidationError, field_validator

from lora_runtime.config.actor import ActorConfig
from lora_runtime.config.algorithm import ALGORITHMS, AlgorithmConfig, GRPOConfig
from lora_runtime.config.base import ConfigError, Strict
from lora_runtime.config.runner import RunnerConfig
from lora_runtime.config.task import DEFAULT_KIND, ReachSection, TaskSection, section_class

# Where each key of the `trainer` section (before the split) lives now.
MOVED_TRAINER_KEYS = {
    **{k: "runner" for k in RunnerConfig.model_fields},
    **{k: "algorithm" for k in GRPOConfig.model_fields if k != "name"},
}


class RunConfig(Strict):
    """A whole run file: `actor` (model + built-in sizes), `task`, `algorithm`, `runner`."""

    actor: ActorConfig
    task: SerializeAsAny[TaskSection] = Field(default_factory=ReachSection)
    algorithm: AlgorithmConfig = Field(default_factory=GRPOConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)

    @field_validator("task", mode="before")
    @classmethod
    def _task_by_kind(cls, value: Any) -> Any:
        if isinstance(value, TaskSection):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping with a kind key, got {type(value).__name__}")  # noqa: TRY004 (pydantic reports ValueError)
        return section_class(value.get("kind", DEFAULT_KIND)).model_validate({"kind": DEFAULT_KIND, **value})


def _describe(error: dict[str, Any], task_kind: str) -> str:
    loc, section = _section_of(tuple(error["loc"]), task_kind)
    dotted = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        parent = _model_at(section, loc[1:-1]) if section is not None else None
        allowed = sorted(parent.model_fields) if parent is not None else []
        key = str(loc[-1])
        hint = difflib.get_close_matches(key, allowed, n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
        where = ""
        if loc[0] == "task":
            where = f" for task.kind {task_kind!r}"
        elif loc[0] == "algorithm" and parent is not None and "name" in parent.model_fields:
            where = f" for algorithm.name {parent.model_fields['name'].default!r}"
        return f"{dotted}: unknown key{where} (allowed: {', '.join(allowed)}){suggestion}"
    if error["type"] == "missing":
        return f"{dotted}: required key is missing"
    if error["type"] == "union_tag_invalid":
        return f"{dotted}.name: got {error['ctx']['tag']!r}: unknown algorithm (allowed: {', '.join(ALGORITHMS)})"
    value = error.get("input")
    msg = str(error.get("ctx", {}).get("error", error["msg"]))
    if isinstance(value, dict):  # a rule across several keys of a section (or sections: no prefix)
        return f"{dotted}: {msg}" if dotted else msg
    return f"{dotted}: got {value!r}: {msg}"


def _section_of(loc: tuple, task_kind: str) -> tuple[tuple, type[BaseModel] | None]:
    """The location as the user wrote it (the algorithm union's tag dropped) and the class of
    its top-level section."""
    if not loc:
        return loc, None
    if loc[0] == "task":
        return loc, section_class(task_kind)
    if loc[0] == "algorithm" and len(loc) > 1 and loc[1] in ALGORITHMS:
        return (loc[0], *loc[2:]), ALGORITHMS[loc[1]]
    field = RunConfig.model_fields.get(loc[0])
    return loc, field.annotation if field is not None and isinstance(field.annotation, type) else None


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
    if "trainer" in raw:
        raise ConfigError(f"{source}: {_moved_trainer(raw['trainer'])}")
    task = raw.get("task")
    kind = task.get("kind", DEFAULT_KIND) if isinstance(task, dict) else DEFAULT_KIND
    try:
        section_class(kind)
        return RunConfig.model_validate(raw)
    except ConfigError as exc:
        raise ConfigError(f"{source}: invalid config:\n  {exc}") from None
    except ValidationError as exc:
        lines = [_describe(e, kind) for e in exc.errors()]
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(lines)) from None



def _moved_trainer(section: Any) -> str:
    """The message for a file (or `--set trainer.x=...`) that still uses the `trainer` section."""
    keys = list(section) if isinstance(section, dict) else []
    moves = [f"trainer.{k} -> {MOVED_TRAINER_KEYS[k]}.{k}" for k in keys if k in MOVED_TRAINER_KEYS]
    unknown = [f"trainer.{k}" for k in keys if k not in MOVED_TRAINER_KEYS]
    text = ("the trainer section was split into algorithm (what is learned and how: batch_size, group_size, lr, ...) "
            "and runner (how the run goes: output_dir, steps, seed, threads, device, ...)")
    if moves:
        text += "; move " + ", ".join(moves)
    if unknown:
        text += "; unknown keys: " + ", ".join(unknown)
    return text


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
