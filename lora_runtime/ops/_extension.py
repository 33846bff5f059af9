"""Loads the compiled extension once; the rest of the package asks `extension_loaded()`."""

from __future__ import annotations

import os
import warnings

import torch  # loads libc10/libtorch, which _C links against

# Every op the Python side registers fakes / autograd for. A library built from older sources
# (an editable install not rebuilt after a pull) lacks some: it is then not used at all.
REQUIRED_OPS = (
    "lora_linear", "lora_linear_fwd", "lora_linear_bwd", "lora_linear_infer",
    "lora_group_fwd", "lora_group_bwd", "lora_group_infer",
    "merge_enter", "merge_leave", "lora_product",
)
# Ops whose autograd formula the library itself registers (C++), with the dispatch key.
REQUIRED_KERNELS = (("lora_linear_fwd", "Autograd"), ("lora_group_fwd", "Autograd"))

_LOAD_ERROR: str | None = None


def _missing_ops(required: tuple[str, ...] = REQUIRED_OPS,
                 kernels: tuple[tuple[str, str], ...] = REQUIRED_KERNELS) -> list[str]:
    """The names in `required` that `torch.ops.lora_runtime` does not have, and the
    `op (key)` of each entry of `kernels` with no kernel for that dispatch key."""
    missing = [name for name in required if not hasattr(torch.ops.lora_runtime, name)]
    for name, key in kernels:
        if name not in missing and not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"lora_runtime::{name}", key
        ):
            missing.append(f"{name} ({key})")
    return missing


try:
    from lora_runtime.ops import _C  # loading it registers torch.ops.lora_runtime

    if _missing_ops():
        _LOAD_ERROR = (
            f"stale build: {_C.__file__} lacks the ops {_missing_ops()} of these sources"
        )
except (ImportError, OSError) as exc:  # missing build, ABI mismatch, wrong torch
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
if _LOAD_ERROR is not None:
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
