"""Every public exception type of lora-runtime, in one module that imports no torch.

Each message says what was expected, what was found and what to do. The modules that raise
these import them from here (and the old homes, `config`, `adapters.merge`,
`adapters.peft_format` and `rl.outputs`, still re-export theirs); `lora_runtime` re-exports
them all.
"""

from __future__ import annotations

__all__ = ["AdapterError", "ConfigError", "MergeError", "UsageError"]


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names file and key."""


class UsageError(ValueError):
    """A bad command line or run setting that is not a config validation error."""


class AdapterError(ValueError):
    """An adapter folder that cannot be saved or loaded; the message says what and where."""


class MergeError(RuntimeError):
    """The adapters' state forbids the call: already merged, disabled, written inside
    `merged`, or an exact restore over the memory limit."""
