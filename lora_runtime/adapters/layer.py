"""`LoRALinear`: an `nn.Linear` with a low-rank adapter, computed by the fused op."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lora_runtime.adapters.siblings import SiblingGroup
from lora_runtime.ops import lora_linear
from lora_runtime.ops.infer import lora_linear_infer
from lora_runtime.ops.merge_exact import lora_product

INIT_METHODS = ("gaussian", "kaiming")


def check_rank(r: object, in_features: int, out_features: int, where: str) -> None:
    """Raises ValueError unless `r` is an int with `1 <= r <= min(in, out)`.

    Args:
        where: what the message names first (a layer path, or "LoRA rank").
    """
    limit = min(in_features, out_features)
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= limit:
        raise ValueError(
            f"{where}: rank r={r!r} does not fit Linear({in_features}, {out_features}): "
            f"allowed 1 <= r <= min(in, out) = {limit}"
        )


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype delta weights and merges are summed in: float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class LoRALinear(nn.Module):
    """Wraps a frozen `nn.Linear` (`base_layer`) and adds `scaling * B @ A` to its weight.

    Parameters, in PEFT's layout and names: `lora_A.weight [r, in]`, `lora_B.weight [out, r]`.
    The forward is one call of `lora_runtime.lora_linear`; with the adapter disabled or
    merged it is exactly `base_layer(x)`.

    Args:
        base_layer: the linear layer to adapt; kept as is (its weight object is not copied).
        r: adapter rank, `1 <= r <= min(in, out)`.
        lora_alpha: scale numerator; None means `r` (scaling 1.0).
        lora_dropout: dropout probability on the LoRA branch input, `0 <= p < 1`.
        use_rslora: `scaling = lora_alpha / sqrt(r)` instead of `lora_alpha / r`.
        init: "gaussian" (A ~ N(0, 1/r), B = 0) or "kaiming" (kaiming-uniform A, B = 0).

    Raises:
        ValueError: a rank out of range, a dropout outside [0, 1), an unknown init.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "gaussian",
    ) -> None:
        super().__init__()
        in_features, out_features = base_layer.in_features, base_layer.out_features
        check_rank(r, in_features, out_features, "LoRALinear")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={lora_dropout!r}: allowed 0 <= p < 1")
        if init not in INIT_METHODS:
            raise ValueError(f"init={init!r}: allowed {list(INIT_METHODS)}")
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.lora_alpha = float(r if lora_alpha is None else lora_alpha)
        self.use_rslora = use_rslora
        self.scaling = self.lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = float(lora_dropout)
        self.init = init
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Linear(in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, out_features, bias=False, **factory)
        self.disable_adapters = False  # True inside adapter_disabled(): exactly the base layer
        self.merged = False  # True while scaling * B @ A is folded into base_layer.weight
        self._group: SiblingGroup | None = None  # set by adapters.grouping.group_siblings
        self._slot = 0  # this layer's index in its group; 0 leads
        self.reset_lora_parameters(init)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "gaussian", generator: torch.Generator | None = None) -> None:
        """Draws A (`"gaussian"`: N(0, std=1/r); `"kaiming"`: kaiming-uniform) and zeroes B.

        Args:
            init: "gaussian" or "kaiming".
            generator: where A is drawn from (a CPU generator; A is drawn on CPU and copied
                for other devices); None draws from torch's default generator.
        """
        if init not in INIT_METHODS:
            raise ValueError(f"init={init!r}: allowed {list(INIT_METHODS)}")
        a = torch.empty(self.lora_A.weight.shape, dtype=self.lora_A.weight.dtype)  # [r, in]
        if generator is None and self.lora_A.weight.device.type != "cpu":
            a = torch.empty_like(self.lora_A.weight)  # the default generator of that device
        if init == "gaussian":
            nn.init.normal_(a, mean=0.0, std=1.0 / self.r, generator=generator)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A.weight.copy_(a)
        nn.init.zeros_(self.lora_B.weight)

    def get_delta_weight(self) -> torch.Tensor:
        """`scaling * B @ A`, `[out, in]`, in float32 (float64 for a float64 base weight).

        The product is `ops.merge_exact.lora_product`'s: on CPU the same bits as `merged()`'s
        fused kernels.
        """
        dtype = accumulation_dtype(self.base_layer.weight.dtype)
        a = self.lora_A.weight.detach().to(dtype)  # [r, in]
        b = self.lora_B.weight.detach().to(dtype)  # [out, r]
        return lora_product(b, a) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return self.base_layer(x)
        if not torch.jit.is_scripting():
            if self._group is not None:
                y = self._group.run(self._slot, x)
                if y is not None:
                    return y
            if not torch.is_grad_enabled() and (self.lora_dropout == 0.0 or not self.training):
                return self._infer_forward(x)
        return self._layer_forward(x)

    def _infer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """No-grad path: one call of the C++ kernel, no autograd formula on the way.

        The tensors are read from the modules' `_parameters` dicts (what `nn.Module.__getattr__`
        returns, without its fallback chain: this runs once per layer per decode token), so a
        parameter swapped in by FSDP2 is seen at once. A base layer whose `weight` is not a
        plain parameter (e.g. `torch.nn.utils.parametrize`) takes the attribute path.
        """
        modules = self._modules
        base_params = modules["base_layer"]._parameters
        weight = base_params.get("weight")
        if weight is None:
            return self._layer_forward(x)
        lora_a = modules["lora_A"]._parameters["weight"]  # [r, in]
        lora_b = modules["lora_B"]._parameters["weight"]  # [out, r]
        if lora_a.dtype != weight.dtype:  # e.g. float32 adapters on a bfloat16 base
            lora_a, lora_b = lora_a.to(weight.dtype), lora_b.to(weight.dtype)
        return lora_linear_infer(x, weight, base_params.get("bias"), lora_a, lora_b, self.scaling)

    def _layer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The per-layer path: one call of the fused op."""
        weight = self.base_layer.weight
        lora_a, lora_b = self.lora_A.weight, self.lora_B.weight
        if lora_a.dtype != weight.dtype:  # e.g. float32 adapters on a bfloat16 base
            lora_a, lora_b = lora_a.to(weight.dtype), lora_b.to(weight.dtype)
        lora_input: Optional[torch.Tensor] = None  # noqa: UP045 (TorchScript: an annotated Optional)
        if self.lora_dropout > 0.0 and self.training:
            lora_input = F.dropout(x, self.lora_dropout, training=True)
        if torch.jit.is_scripting():  # TorchScript calls the registered op directly
            return torch.ops.lora_runtime.lora_linear(
                x, weight, self.base_layer.bias, lora_a, lora_b, self.scaling, lora_input
            )
        return lora_linear(
            x, weight, self.base_layer.bias, lora_a, lora_b, self.scaling, lora_input
        )

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, lora_alpha={self.lora_alpha:g}, scaling={self.scaling:g}, "
            f"lora_dropout={self.lora_dropout:g}, use_rslora={self.use_rslora}"
        )
