"""The fused exact merge (`ops.merge_exact`, csrc/merge_exact.cpp) against the tensor-op path.

Both must give the same merged weight (the one `merged_weight` defines), the same store
(mask, values or copy, checksum) and the original weight back bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora_runtime.adapters import LoRALinear, MergeError, merge_store, merged
from lora_runtime.adapters.merge_bits import bits, checksum
from lora_runtime.adapters.merge_store import _enter_with_tensor_ops, add_delta, sub_delta
from lora_runtime.ops._extension import extension_loaded
from lora_runtime.ops.merge_exact import fused_merge_applies, lora_product, merge_enter, merge_leave

pytestmark = pytest.mark.skipif(not extension_loaded(), reason="needs the compiled extension")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _same_bits_nan_as_nan(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit-equal everywhere except that any NaN matches any NaN (torch's vectorised
    float -> bfloat16 conversion writes NaN as 0xFFFF, c10's scalar one as 0x7FC0)."""
    nan = torch.isnan(x)
    return torch.equal(nan, torch.isnan(y)) and torch.equal(bits(x)[~nan], bits(y)[~nan])


def _weight_and_factors(dtype, out=37, inp=45, r=5, delta_scale=1e-2, seed=0, nan=True):
    """A weight with signed zeros and a NaN (unless `nan` is False), and non-zero B, A."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g, dtype=torch.float64).to(dtype)  # [out, in]
    w[0, 0], w[0, 1] = 0.0, -0.0
    if nan:
        w.view(-1)[7] = float("nan")
    b = torch.randn(out, r, generator=g, dtype=_acc(dtype)) * delta_scale  # [out, r]
    a = torch.randn(r, inp, generator=g, dtype=_acc(dtype))  # [r, in]
    b[0] = 0.0  # row 0's delta is exactly zero: the signed zeros must survive as they are
    return w, b, a


# The kernels compute B @ A in tiles of 8 rows. (37, 45): a partial tile, a partial chunk of
# the loops and a partial mask byte; (129, 257): 17 tiles, the last of one row; (83, 2053):
# rows of many chunks and a column tail of the product's loop (2053 = 32 * 64 + 5)
SHAPES = [(37, 45), (129, 257), (83, 2053)]


def _product_in_order(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """B @ A as lora_product defines it, in tensor ops: the rank's terms added in order, each
    product and each sum rounded on its own."""
    acc = b[:, :1] * a[:1]  # [out, in]
    for k in range(1, a.shape[0]):
        acc = acc + b[:, k : k + 1] * a[k : k + 1]
    return acc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 5, 45), (129, 32, 257), (83, 16, 2053), (9, 3, 64)])
def test_lora_product_sums_the_rank_in_order_and_is_close_to_float64(dtype, shape):
    out, r, inp = shape
    g = torch.Generator().manual_seed(out + inp)
    b = torch.randn(out, r, generator=g, dtype=dtype)  # [out, r]
    a = torch.randn(r, inp, generator=g, dtype=dtype)  # [r, in]
    got = lora_product(b, a)
    assert got.dtype == dtype and got.shape == (out, inp)
    assert torch.equal(bits(got), bits(_product_in_order(b, a)))
    exact = b.double() @ a.double()
    tol = r * torch.finfo(dtype).eps * (b.double().abs() @ a.double().abs())
    assert ((got.double() - exact).abs() <= tol).all()
    # strided factors give the same bits (the op makes them contiguous)
    assert torch.equal(bits(lora_product(b.t().contiguous().t(), a)), bits(got))


def test_lora_product_refuses_what_does_not_fit():
    b, a = torch.randn(4, 3), torch.randn(2, 5)
    with pytest.raises(RuntimeError, match=r"lora_b \[4, 3\] and lora_a \[2, 5\] do not fit"):
        torch.ops.lora_runtime.lora_product(b, a)
    with pytest.raises(RuntimeError, match="must both be Float or both Double, got Float and Double"):
        torch.ops.lora_runtime.lora_product(b, torch.randn(3, 5, dtype=torch.float64))
    # the Python door takes other dtypes to a plain matmul
    half = lora_product(b.half(), torch.randn(3, 5).half())
    assert half.dtype == torch.float16


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("delta_scale", [1e-3, 10.0])  # small: patch store; large: copy store
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_store_equals_tensor_op_store_and_restores_bits(dtype, delta_scale, shape):
    # bfloat16 / float16 NaNs are rounded to different payloads by the two paths (both restore
    # them exactly: see the next test), so the stores are compared on NaN-free weights there
    w, b, a = _weight_and_factors(dtype, *shape, delta_scale=delta_scale,
                                  nan=dtype in (torch.float32, torch.float64))
    product = lora_product(b, a)  # [out, in]: the whole product, as the tensor-op path takes it
    scaling = 1.7
    original = w.clone()
    reference_w = w.clone()
    reference = _enter_with_tensor_ops(reference_w, product * scaling)

    fused = merge_enter(w, b, a, scaling)

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
        restored_sum = merge_leave(w, b, a, scaling, fused)
        assert restored_sum == fused.checksum
    else:
        assert torch.equal(bits(fused.copy), bits(original))
        assert delta_scale == 10.0
        w.copy_(fused.copy)
    assert torch.equal(bits(w), bits(original))  # -0.0 and the NaN payload included


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_merge_restores_nan_payloads_and_signed_zeros(dtype, shape):
    w, b, a = _weight_and_factors(dtype, *shape, delta_scale=1e-3)
    w.view(bits(w).dtype).view(-1)[8] = bits(w).view(-1)[7] | 1  # a NaN with another payload
    w.view(bits(w).dtype).view(-1)[-2] = bits(w).view(-1)[7] | 3  # and one in the last block
    w.view(-1)[-1] = -0.0
    original = w.clone()
    store = merge_enter(w, b, a, 2.5)
    assert torch.isnan(w.view(-1)[7]) and torch.isnan(w.view(-1)[8])
    assert merge_leave(w, b, a, 2.5, store) == store.checksum == checksum(original)
    assert torch.equal(bits(w), bits(original))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_leave_without_patch_is_round_of_the_difference(dtype):
    w, b, a = _weight_and_factors(dtype, delta_scale=1e-3)
    merged = w.clone()
    store = merge_enter(merged, b, a, 0.5)
    expected = sub_delta(merged, lora_product(b, a) * 0.5)  # what the restore computes before patching
    no_patch = store._replace(mask=None, values=store.values[:0])
    merge_leave(merged, b, a, 0.5, no_patch)
    assert _same_bits_nan_as_nan(merged, expected)
    assert int((bits(merged) != bits(w)).sum()) == store.values.numel()


def test_leave_refuses_a_store_that_does_not_fit_and_changes_nothing():
    w, b, a = _weight_and_factors(torch.float32, delta_scale=1e-3)
    store = merge_enter(w, b, a, 1.0)
    assert store.mask is not None and store.values.numel() > 1
    before = w.clone()
    short = store._replace(values=store.values[:-1].clone())
    with pytest.raises(RuntimeError, match="mask flags .* elements but .* values were kept"):
        merge_leave(w, b, a, 1.0, short)
    assert torch.equal(bits(w), bits(before))
    with pytest.raises(RuntimeError, match="lora_b and lora_a must be Float for a BFloat16 "
                                           "weight, got Double and Float"):
        merge_enter(w.to(torch.bfloat16), b.double(), a, 1.0)
    with pytest.raises(RuntimeError, match=r"weight \[37, 45\], lora_b \[37, 5\] and lora_a "
                                           r"\[5, 44\] do not fit: need \[out, in\], \[out, r\] and \[r, in\]"):
        merge_enter(w, b, a[:, :-1].contiguous(), 1.0)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        merge_enter(w, b, a.t().contiguous().t(), 1.0)
    assert torch.equal(bits(w), bits(before))  # the refused calls changed nothing


def test_fused_path_applies_only_where_it_can():
    w, b, a = _weight_and_factors(torch.float32)
    assert fused_merge_applies(w, b, a)
    assert not fused_merge_applies(w.t(), a.t(), b.t())  # not contiguous
    assert not fused_merge_applies(w[:, :3], b, a[:, :3])
    assert not fused_merge_applies(w, b[:-1], a)
    assert not fused_merge_applies(w.to(torch.int32), b, a)


# `merged(...)` through `adapters/merge_store.py`'s tensor-op path (what runs on GPU and
# without the extension) against the fused path, and the restore's reports.


def _two_layers(dtype: torch.dtype, std: float, specials: bool) -> nn.Module:
    """Two `LoRALinear`s with random non-zero adapters (scalings 5/3 and 7/sqrt(2))."""
    torch.manual_seed(0)
    model = nn.Sequential(
        LoRALinear(nn.Linear(24, 20), 3, lora_alpha=5),
        LoRALinear(nn.Linear(20, 16, bias=False), 2, lora_alpha=7, use_rslora=True),
    ).to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model:
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
        if specials:  # signed zeros and a NaN must come back bit for bit
            w = model[0].base_layer.weight
            w[0, 0], w[0, 1], w[1, 1] = 0.0, -0.0, float("nan")
    return model


def _weight_bits(model: nn.Module) -> list[torch.Tensor]:
    return [layer.base_layer.weight.detach().clone() for layer in model]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("std", [0.05, 4.0])  # small deltas: patch stores; large: plain copies
def test_merged_on_the_tensor_op_path_equals_the_fused_path_and_restores_bits(monkeypatch, dtype, std):
    specials = dtype in (torch.float32, torch.float64)  # bf16/f16 NaN payloads differ by path
    fused_model, model = _two_layers(dtype, std, specials), _two_layers(dtype, std, specials)
    before = _weight_bits(model)
    adapters = [(ly.lora_A.weight.clone(), ly.lora_B.weight.clone()) for ly in model]
    with merged(fused_model) as fused_stats:
        fused = _weight_bits(fused_model)
    monkeypatch.setattr(merge_store, "fused_merge_applies", lambda *tensors: False)
    with merged(model) as stats:
        for layer, want, w0, scaling in zip(model, fused, before, (5 / 3, 7 / math.sqrt(2))):
            got = layer.base_layer.weight
            assert _same_bits_nan_as_nan(got, want)
            a, b = layer.lora_A.weight.double(), layer.lora_B.weight.double()
            exact = w0.double() + scaling * (b @ a)  # [out, in] float64 reference
            tol = 2 * torch.finfo(dtype).eps * (w0.double().abs() + scaling * (b.abs() @ a.abs()))
            fin = torch.isfinite(exact)
            assert ((got.double() - exact).abs()[fin] <= tol[fin]).all()
    assert stats == fused_stats
    assert stats.layers == 2 and stats.total_elements == 24 * 20 + 20 * 16
    if std == 4.0 and dtype in (torch.bfloat16, torch.float16):  # plain copies of W, and the adapters
        assert stats.patched_elements == 0
        held = sum(w.numel() for w in before) + sum(a.numel() + b.numel() for a, b in adapters)
        assert stats.extra_bytes == held * before[0].element_size()
    elif std == 0.05:
        assert 0 < stats.patched_elements < stats.total_elements
    for layer, w0, (a, b) in zip(model, before, adapters):
        assert torch.equal(bits(layer.base_layer.weight), bits(w0))
        assert torch.equal(layer.lora_A.weight, a) and torch.equal(layer.lora_B.weight, b)
        assert layer.merged is False


@pytest.mark.parametrize("fused", [True, False])
def test_a_patched_weight_written_inside_merged_is_reported_as_not_restorable(monkeypatch, fused):
    if not fused:
        monkeypatch.setattr(merge_store, "fused_merge_applies", lambda *tensors: False)
    model = _two_layers(torch.bfloat16, 0.05, specials=False)
    with pytest.raises(MergeError) as err, merged(model), torch.no_grad():
        model[1].base_layer.weight.add_(1.0)
    assert str(err.value) == (
        "merged: tensors were modified in place inside merged(...): '1.base_layer.weight' "
        "(it cannot be restored exactly). merged() is for inference; write weights outside it"
    )
    assert not model[1].merged and not model[0].merged


@pytest.mark.parametrize("fused", [True, False])
def test_a_write_that_escapes_the_version_counter_fails_the_bit_exact_check(monkeypatch, fused):
    if not fused:
        monkeypatch.setattr(merge_store, "fused_merge_applies", lambda *tensors: False)
    model = _two_layers(torch.float32, 0.05, specials=False)
    with pytest.raises(MergeError) as err, merged(model):
        model[0].base_layer.weight.data.add_(1.0)  # `.data`: no version bump; unpatched elements wrong
    assert str(err.value) == (
        "merged: tensors were modified in place inside merged(...): '0.base_layer.weight' "
        "failed the bit-exact check. merged() is for inference; write weights outside it"
    )


def test_an_adapter_written_inside_merged_is_put_back_before_the_weight_is_restored():
    model = _two_layers(torch.float32, 0.05, specials=False)
    before = _weight_bits(model)
    a0, b0 = model[1].lora_A.weight.clone(), model[1].lora_B.weight.clone()
    with pytest.raises(MergeError) as err, merged(model), torch.no_grad():
        model[1].lora_B.weight.mul_(3.0)
    assert str(err.value) == (
        "merged: tensors were modified in place inside merged(...): '1' adapters (restored to "
        "their values at entry). merged() is for inference; write weights outside it"
    )
    assert torch.equal(model[1].lora_A.weight, a0) and torch.equal(model[1].lora_B.weight, b0)
    for layer, w0 in zip(model, before):  # restored with the entry adapters: bit for bit
        assert torch.equal(bits(layer.base_layer.weight), bits(w0))


def test_add_and_sub_delta_sum_in_the_accumulation_dtype_and_round_once():
    # bfloat16 keeps 8 significant bits: half an ulp of 1.0 is 2^-8. The exact sums round
    # once (1 + 2^-8 + 2^-16 -> 1 + 2^-7); rounding the delta to bf16 first would give 1.0
    w = torch.tensor([1.0, 1.0, -2.0, 0.0], dtype=torch.bfloat16)
    delta = torch.tensor([2**-8 + 2**-16, 2**-8 - 2**-16, 2**-7 + 2**-20, -0.0])  # float32
    keep = delta.clone()
    merged_w = merge_store.add_delta(w, delta.clone())
    expected = (w.double() + delta.double()).to(torch.bfloat16)
    assert expected.tolist() == [1.0 + 2**-7, 1.0, -2.0 + 2**-7, 0.0]
    assert merged_w.dtype == torch.bfloat16 and torch.equal(bits(merged_w), bits(expected))
    restored = merge_store.sub_delta(merged_w, delta)
    assert torch.equal(delta, keep)
    assert restored.dtype == torch.bfloat16
    assert torch.equal(bits(restored), bits((merged_w.double() - delta.double()).to(torch.bfloat16)))
    # float32: the result is a new tensor; the merged weight and the delta are left alone
    w32 = torch.tensor([1.0, -3.0])
    d32 = torch.tensor([2**-30, 0.5])
    m32 = merge_store.add_delta(w32, d32.clone())
    assert m32.tolist() == [1.0, -2.5]
    back = merge_store.sub_delta(m32, d32)
    assert back.tolist() == [1.0, -3.0] and m32.tolist() == [1.0, -2.5] and back.data_ptr() != m32.data_ptr()
    # float64 weights are summed in float64
    w64 = torch.tensor([1.0], dtype=torch.float64)
    assert merge_store.add_delta(w64, torch.tensor([2**-40], dtype=torch.float64)).item() == 1.0 + 2**-40
    assert merge_store.sub_delta(torch.tensor([1.0 + 2**-40], dtype=torch.float64),
                                 torch.tensor([2**-40], dtype=torch.float64)).item() == 1.0
    assert merge_store.nbytes(torch.zeros(3, 5, dtype=torch.float16)) == 30


@pytest.mark.parametrize("dtype, numel, patched, copy", [
    (torch.bfloat16, 8, 0, False),  # nothing to patch: no mask, no values
    (torch.bfloat16, 8, 7, False),  # 7 * 2 + 1 = 15 < 16 bytes
    (torch.bfloat16, 16, 15, True),  # 15 * 2 + 2 = 32 >= 32: a plain copy
    (torch.bfloat16, 17, 16, True),  # 32 + 3 = 35 >= 34
    (torch.bfloat16, 17, 15, False),  # 30 + 3 = 33 < 34
    (torch.bfloat16, 25, 23, True),  # 46 + 4 = 50 >= 50
    (torch.float32, 8, 8, True),  # 32 + 1 >= 32
    (torch.float32, 9, 8, False),  # 32 + 2 < 36
])
def test_the_store_is_a_copy_exactly_when_the_patch_would_not_be_smaller(dtype, numel, patched, copy):
    """The rule: a plain copy when `patched * element_size + ceil(numel / 8)` bytes (values and
    the bitmask) >= W's bytes. W's first `patched` elements are lost to a huge delta (W + d
    rounds to d: `round(M - d)` is 0), the rest are 0.0 and come back exactly."""
    big = 2.0**12 if dtype == torch.bfloat16 else 2.0**25  # far above W: rounds W away
    w = torch.zeros(numel, dtype=torch.float64)
    w[:patched] = 1 + torch.arange(1, patched + 1, dtype=torch.float64) / 128
    w = w.to(dtype).reshape(1, numel)
    b, a = torch.full((1, 1), big), torch.ones(1, numel)  # B @ A = big everywhere, float32
    for store in (_enter_with_tensor_ops(w.clone(), b @ a), merge_enter(w.clone(), b, a, 1.0)):
        assert (store.copy is not None) == copy
        if copy:
            assert torch.equal(bits(store.copy), bits(w)) and store.mask is None and store.values.numel() == 0
        else:
            assert torch.equal(bits(store.values), bits(w[0, :patched]))
            assert (store.mask is None) == (patched == 0)
            assert store.checksum == checksum(w)
