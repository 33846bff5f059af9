"""Shared fixtures: the isolation every test gets (its own seeds, and the global RNG state,
thread count and default dtype put back afterwards: the suite runs in random order, see
TESTING.md), the built-in base the trainer tests share, and tiny models. Helpers that tests
import live in `tests/support/`."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from support.isolation import isolated, seed_of
from support.models import make_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _isolate_each_test(request):
    """Every test starts from seeds of its own and leaves the global RNG state, the
    thread count and the default dtype as it found them."""
    dtype = torch.get_default_dtype()
    with isolated(seed_of(request.node.nodeid), threads=None):
        yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """A folder holding the built-in bases of `support.tiny_runs.tiny_raw`: the warm-started
    one (200 steps) and the untrained one (`untrained_raw`, 0 steps), built once per session
    and shared by the CLI, trainer, wiring and reproducibility tests. Runs only read it (a
    config with another recipe adds its own `tiny-vla-<digest>/` beside)."""
    from support.tiny_runs import tiny_raw, untrained_raw

    from lora_runtime.config import validate_config
    from lora_runtime.rl.builtin_base import ensure_builtin_base

    d = tmp_path_factory.mktemp("base")
    for raw in (tiny_raw(d / "x", d), untrained_raw(d / "x", d)):
        with isolated():
            ensure_builtin_base(validate_config(raw), log=lambda m: None)
    return d


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    """The test runs under this umask (the usual one, and one that keeps files from others)."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


@pytest.fixture
def one_thread():
    """Tiny models: one thread is as fast and does not fight other processes for cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def token_ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def clone():
    return copy.deepcopy
