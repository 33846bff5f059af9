"""Loads the compiled extension once; the rest of the package asks `extension_loaded()`."""

from __future__ import annotations

import os
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

_LOAD_ERROR: str | None = None

try:
    from lora_runtime.ops import _C  # loading it registers torch.ops.lora_runtime
except (ImportError, OSError) as exc:  # missing build, ABI mismatch, wrong torch
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "lora_runtime: the compiled extension lora_runtime.ops._C could not be loaded "
        f"({_LOAD_ERROR}); using the pure-PyTorch reference path (slower, more memory). "
        "Rebuild with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_loaded() -> bool:
    """True when the fused C++ op `torch.ops.lora_runtime.lora_linear` is active."""
    return _LOAD_ERROR is None


def extension_error() -> str | None:
    """Why the extension failed to load, or None when it is loaded."""
    return _LOAD_ERROR


def library_path() -> str:
    """The path of the compiled op library (`lora_runtime/ops/_C*.so`).

    A process that runs a TorchScript file or an AOTInductor package holding unmerged
    adapters loads it with `torch.ops.load_library(path)` (C++: link it, or `dlopen` it,
    before loading the model); nothing else of lora-runtime is needed there.

    Raises:
        RuntimeError: the extension is not built or did not load (with the reason).
    """
    if _LOAD_ERROR is not None:
        raise RuntimeError(f"lora_runtime: the op library is not available ({_LOAD_ERROR}); "
                           "build it with `pip install --no-build-isolation -e .`")
    return os.path.abspath(_C.__file__)
