"""Inference-only doors to the kernels: no autograd formula, the least Python per call.

`lora_linear_infer` and `lora_group_infer` compute what `lora_linear` / `lora_group` do,
through ops that have no registered autograd, so a call under `torch.no_grad()` or
`torch.inference_mode()` goes straight to the C++ kernel. Callers use them only when no
gradient is wanted (the layer checks `torch.is_grad_enabled()`); LoRA dropout is not
supported here (it is a training-time feature). Without the extension they fall back to
the plain-PyTorch references.
"""

from __future__ import annotations

import torch

from lora_runtime.ops._extension import extension_loaded
from lora_runtime.ops.lora_group import lora_group_reference
from lora_runtime.ops.reference import lora_linear_reference

__all__ = ["lora_group_infer", "lora_linear_infer"]

if extension_loaded():
    _LINEAR = torch.ops.lora_runtime.lora_linear_infer.default
    _GROUP = torch.ops.lora_runtime.lora_group_infer.default

    @torch.library.register_fake("lora_runtime::lora_linear_infer")
    def _linear_fake(x, weight, bias, lora_a, lora_b, scaling):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))  # [..., out]

    @torch.library.register_fake("lora_runtime::lora_group_infer")
    def _group_fake(x, weights, biases, lora_a, lora_bs, scalings):
        return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]  # [..., out_i]

    lora_linear_infer = _LINEAR
    lora_group_infer = _GROUP
else:

    def lora_linear_infer(x, weight, bias, lora_a, lora_b, scaling):
        return lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling)

    lora_group_infer = lora_group_reference
