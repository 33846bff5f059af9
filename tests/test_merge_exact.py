"""The fused exact merge (`ops.merge_exact`, csrc/merge_exact.cpp) against the tensor-op path.

Both must give the same merged weight (the one `merged_weight` defines), the same store
(mask, values or copy, checksum) and the original weight back bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from lora_runtime.adapters.merge_bits import bits, checksum
from lora_runtime.adapters.merge_store import _enter_with_tensor_ops, add_delta, sub_delta
from lora_runtime.ops._extension import extension_loaded
from lora_runtime.ops.merge_exact import fused_merge_applies, merge_enter, merge_leave

pytestmark = pytest.mark.skipif(not extension_loaded(), reason="needs the compiled extension")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _same_bits_nan_as_nan(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit-equal everywhere except that any NaN matches any NaN (torch's vectorised
    float -> bfloat16 conversion writes NaN as 0xFFFF, c10's scalar one as 0x7FC0)."""
    nan = torch.isnan(x)
    return torch.equal(nan, torch.isnan(y)) and torch.equal(bits(x)[~nan], bits(y)[~nan])


def _weight_and_product(dtype, out=37, inp=45, r=5, delta_scale=1e-2, seed=0, nan=True):
    """A weight with signed zeros and a NaN (unless `nan` is False), and a non-zero B @ A."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g, dtype=torch.float64).to(dtype)  # [out, in]
    w[0, 0], w[0, 1] = 0.0, -0.0
    if nan:
        w.view(-1)[7] = float("nan")
    b = torch.randn(out, r, generator=g, dtype=_acc(dtype)) * delta_scale  # [out, r]
    a = torch.randn(r, inp, generator=g, dtype=_acc(dtype))  # [r, in]
    b[0] = 0.0  # row 0's delta is exactly zero: the signed zeros must survive as they are
    return w, b @ a


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("delta_scale", [1e-3, 10.0])  # small: patch store; large: copy store
def test_fused_store_equals_tensor_op_store_and_restores_bits(dtype, delta_scale):
    # bfloat16 / float16 NaNs are rounded to different payloads by the two paths (both restore
    # them exactly: see the next test), so the stores are compared on NaN-free weights there
    w, product = _weight_and_product(dtype, delta_scale=delta_scale,
                                     nan=dtype in (torch.float32, torch.float64))
    scaling = 1.7
    original = w.clone()
    reference_w = w.clone()
    reference = _enter_with_tensor_ops(reference_w, product * scaling)

    fused = merge_enter(w, product, scaling)

    # the same merged weight, bit for bit (a NaN stays a NaN; its payload may differ)
    assert _same_bits_nan_as_nan(w, reference_w)
    assert _same_bits_nan_as_nan(w, add_delta(original, product * scaling))
    assert (fused.copy is None) == (reference.copy is None)
    if fused.copy is None:
        assert fused.checksum == reference.checksum == checksum(original)
        assert (fused.mask is None) == (reference.mask is None)
        if fused.mask is not None:
            assert torch.equal(fused.mask, reference.mask)
        assert torch.equal(bits(fused.values), bits(reference.values))
        assert fused.values.numel() > 0  # the test weights do need patching
        restored_sum = merge_leave(w, product, scaling, fused)
        assert restored_sum == fused.checksum
    else:
        assert torch.equal(bits(fused.copy), bits(original))
        assert delta_scale == 10.0
        w.copy_(fused.copy)
    assert torch.equal(bits(w), bits(original))  # -0.0 and the NaN payload included


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_merge_restores_nan_payloads_and_signed_zeros(dtype):
    w, product = _weight_and_product(dtype, delta_scale=1e-3)
    w.view(bits(w).dtype).view(-1)[8] = bits(w).view(-1)[7] | 1  # a NaN with another payload
    original = w.clone()
    store = merge_enter(w, product, 2.5)
    assert torch.isnan(w.view(-1)[7]) and torch.isnan(w.view(-1)[8])
    assert merge_leave(w, product, 2.5, store) == store.checksum == checksum(original)
    assert torch.equal(bits(w), bits(original))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leave_without_patch_is_round_of_the_difference(dtype):
    w, product = _weight_and_product(dtype, delta_scale=1e-3)
    merged = w.clone()
    store = merge_enter(merged, product, 0.5)
    expected = sub_delta(merged, product * 0.5)  # what the restore computes before patching
    no_patch = store._replace(mask=None, values=store.values[:0])
    merge_leave(merged, product, 0.5, no_patch)
    assert _same_bits_nan_as_nan(merged, expected)
    assert int((bits(merged) != bits(w)).sum()) == store.values.numel()


def test_leave_refuses_a_store_that_does_not_fit_and_changes_nothing():
    w, product = _weight_and_product(torch.float32, delta_scale=1e-3)
    store = merge_enter(w, product, 1.0)
    assert store.mask is not None and store.values.numel() > 1
    before = w.clone()
    short = store._replace(values=store.values[:-1].clone())
    with pytest.raises(RuntimeError, match="mask flags .* elements but .* values were kept"):
        merge_leave(w, product, 1.0, short)
    assert torch.equal(bits(w), bits(before))
    with pytest.raises(RuntimeError, match="the product must be Float for a BFloat16 weight"):
        merge_enter(w.to(torch.bfloat16), product.double(), 1.0)
    with pytest.raises(RuntimeError, match="must have one shape"):
        merge_enter(w, product[:, :-1].contiguous(), 1.0)


def test_fused_path_applies_only_where_it_can():
    w, product = _weight_and_product(torch.float32)
    assert fused_merge_applies(w, product)
    assert not fused_merge_applies(w.t(), product.t())  # not contiguous
    assert not fused_merge_applies(w[:, :3], product[:, :3])
    assert not fused_merge_applies(w.to(torch.int32), product)
