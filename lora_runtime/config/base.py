"""What every config section shares: unknown keys are errors, assignments are validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from lora_runtime.errors import ConfigError

__all__ = ["ConfigError", "Strict", "not_blank"]


class Strict(BaseModel):
    """A config section: unknown keys are refused and assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def not_blank(path: str | None) -> str | None:
    """A path key's check: null is allowed, an empty or all-blank string is not."""
    if path is not None and not path.strip():
        raise ValueError("an empty path is not allowed (give a path, or null where the key may be null)")
    return path
