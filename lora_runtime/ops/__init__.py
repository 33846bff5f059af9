"""The fused LoRA op and nothing else: the C++ library, its Python door, the reference.

`lora_linear` computes `x @ W.T + bias + scaling * (x @ A.T) @ B.T` as one registered op
(`torch.ops.lora_runtime.lora_linear`, built from `csrc/`); `lora_linear_reference` is the
same formula in plain PyTorch. Nothing here imports any other part of the package.
"""

from lora_runtime.ops import infer, merge_exact  # noqa: F401  (registers their fake kernels)
from lora_runtime.ops._extension import extension_error, extension_loaded, library_path
from lora_runtime.ops.lora_group import lora_group, lora_group_reference
from lora_runtime.ops.lora_linear import lora_linear
from lora_runtime.ops.reference import lora_linear_reference

__all__ = [
    "extension_error",
    "extension_loaded",
    "library_path",
    "lora_group",
    "lora_group_reference",
    "lora_linear",
    "lora_linear_reference",
]
