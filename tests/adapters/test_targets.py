"""Target matching and the patched-layer helpers of `adapters/targets.py`, on small
hand-built models: dot boundaries, regex full match, nesting, wrappers, the skip warning."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from lora_runtime.adapters import LoRALinear, apply_lora
from lora_runtime.adapters.targets import (
    find_targets,
    inside_any,
    iter_lora_layers,
    matches_target,
    restore_base_layers,
    set_submodule,
    target_predicate,
    unwrap_model,
)


def block() -> nn.Module:
    m = nn.Module()
    m.q_proj, m.k_proj, m.proj, m.norm = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2), nn.LayerNorm(4)
    return m


def model_of(n: int = 2) -> nn.Module:
    model = nn.Module()
    model.layers = nn.ModuleList([block() for _ in range(n)])
    model.head = nn.Linear(4, 3)
    return model


@pytest.mark.parametrize("name, targets, expected", [
    ("layers.0.q_proj", ["q_proj"], True),
    ("q_proj", ["q_proj"], True),
    ("layers.0.q_proj", ["0.q_proj"], True),
    ("layers.0.attn_q_proj", ["q_proj"], False),  # not on a dot boundary
    ("layers.0.q_proj.inner", ["q_proj"], False),
    ("layers.0.k_proj", ["q_proj", "k_proj"], True),
    ("layers.0.k_proj", [], False),
])
def test_matches_target_on_dot_boundaries(name, targets, expected):
    assert matches_target(name, targets) is expected


def test_target_predicate_names_or_a_fully_matching_regex():
    names = target_predicate(["q_proj"])
    assert names("layers.1.q_proj") and not names("layers.1.k_proj")
    regex = target_predicate(r"layers\.[01]\.(q|k)_proj")
    assert regex("layers.0.q_proj") and regex("layers.1.k_proj")
    assert not regex("layers.2.q_proj") and not regex("x.layers.0.q_proj") and not regex("layers.0.q_proj.w")
    once = iter(["q_proj"])  # an iterator is read once and kept
    pred = target_predicate(once)
    assert pred("a.q_proj") and pred("b.q_proj")


@pytest.mark.parametrize("path, roots, expected", [
    ("layers.1", ["layers.1"], True),
    ("layers.1.lora_A", ["layers.1"], True),
    ("layers.10", ["layers.1"], False),  # a prefix that is not a module boundary
    ("layers", ["layers.1"], False),
    ("layers.1", [], False),
])
def test_inside_any(path, roots, expected):
    assert inside_any(path, roots) is expected


def test_unwrap_model_removes_nested_wrappers_and_leaves_plain_models():
    model = model_of()
    assert unwrap_model(model) is model
    wrapped = torch.compile(model)  # an OptimizedModule, never run
    assert isinstance(wrapped, torch._dynamo.eval_frame.OptimizedModule) and unwrap_model(wrapped) is model
    twice = torch._dynamo.eval_frame.OptimizedModule(wrapped, wrapped.dynamo_ctx)  # nested wrappers
    assert unwrap_model(twice) is model


def test_iter_set_find_and_restore():
    model = model_of()
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    found = find_targets(model, ["q_proj", "proj"], exclude_modules=["1.proj"])
    assert [n for n, _ in found] == ["layers.0.q_proj", "layers.0.proj", "layers.1.q_proj"]
    assert all(m is originals[n] for n, m in found)
    for name, module in found:
        set_submodule(model, name, LoRALinear(module, 2))
    set_submodule(model, "head", LoRALinear(model.head, 2))  # a top-level path
    assert [n for n, _ in iter_lora_layers(model)] == ["layers.0.q_proj", "layers.0.proj", "layers.1.q_proj", "head"]
    assert [n for n, _ in iter_lora_layers(torch.compile(model))] == [n for n, _ in iter_lora_layers(model)]
    # the patched layers' parts are never targets again; the rest still are
    with pytest.warns(UserWarning, match="skipping modules that match a target but are not nn.Linear"):
        everything = find_targets(model, r".*")  # ".*" matches the containers and norms too
    assert [n for n, _ in everything] == ["layers.0.k_proj", "layers.1.k_proj", "layers.1.proj"]
    restore_base_layers(torch.compile(model))
    assert not list(iter_lora_layers(model))
    assert {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)} == originals
    assert all(dict(model.named_modules())[n] is m for n, m in originals.items())


def test_non_linear_matches_warn_once_listing_eight_and_the_count():
    model = model_of(n=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = find_targets(model, ["norm", "q_proj"])
    assert [n for n, _ in found] == [f"layers.{i}.q_proj" for i in range(10)]
    (w,) = caught
    shown = ", ".join(f"layers.{i}.norm (LayerNorm)" for i in range(8))
    assert str(w.message) == f"apply_lora: skipping modules that match a target but are not nn.Linear: {shown}, ... (10 in all)"
    assert w.category is UserWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        find_targets(model_of(n=8), ["norm"])
    (w,) = caught
    assert str(w.message).endswith("layers.7.norm (LayerNorm)")  # eight: no count
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        find_targets(model_of(n=9), ["norm"])
    (w,) = caught
    assert str(w.message).endswith("layers.7.norm (LayerNorm), ... (9 in all)")  # nine: eight and the count
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_targets(model_of(), ["q_proj"])  # no warning without a skipped module


@pytest.mark.skipif("MUTANT_UNDER_TEST" in os.environ, reason="mutmut's trampolines add stack frames")
def test_the_skip_warning_points_at_the_caller_of_apply_lora():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_lora(model_of(n=1), 1, target_modules=["norm", "q_proj"])
    (w,) = caught
    assert w.category is UserWarning
    assert os.path.realpath(w.filename) == os.path.realpath(__file__)  # this line, not the library


def test_unwrap_model_and_iter_lora_layers_see_through_ddp():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one rank, in process
    try:
        model = model_of(n=1)
        set_submodule(model, "head", LoRALinear(model.head, 1))
        ddp = DistributedDataParallel(model)
        assert unwrap_model(ddp) is model
        assert unwrap_model(torch.compile(ddp)) is model  # compile around DDP
        assert [n for n, _ in iter_lora_layers(ddp)] == ["head"]  # no "module." prefix
        assert [n for n, _ in find_targets(ddp, ["q_proj"])] == ["layers.0.q_proj"]
    finally:
        dist.destroy_process_group()
