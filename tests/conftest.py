"""Shared fixtures: tiny models built from configs (no hub), non-zero adapters, and the
isolation every test gets: its own seeds, and the global RNG state and thread count put
back afterwards (the suite runs in random order, see TESTING.md)."""

from __future__ import annotations

import contextlib
import copy
import os
import random
import zlib

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_tiny_llama(seed: int = 0, layers: int = 2, dtype: torch.dtype = torch.float32):
    """A 2-layer Llama (hidden 64) with random weights, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def randomize_lora(model: torch.nn.Module, std: float = 0.05, seed: int = 1) -> None:
    """Draws non-zero lora_A and lora_B so the LoRA path changes the outputs."""
    from lora_runtime.adapters import iter_lora_layers

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in iter_lora_layers(model):
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def make_patched_model(kind: str, dtype: torch.dtype = torch.float32, std: float = 0.05):
    """A patched model with non-zero adapters: the 1-layer tiny Llama ("llama"), or a model
    made only of the runtime's layers ("layers": LoRALinear -> GELU -> LoRALinear)."""
    from torch import nn

    from lora_runtime.adapters import LoRALinear, apply_lora

    if kind == "llama":
        model = apply_lora(make_tiny_llama(layers=1), 4, alpha=8)
    else:
        torch.manual_seed(0)
        model = nn.Sequential(
            LoRALinear(nn.Linear(32, 64), 4, lora_alpha=8), nn.GELU(),
            LoRALinear(nn.Linear(64, 48, bias=False), 4, lora_alpha=8),
        )
    randomize_lora(model, std=std)
    return model.to(dtype).eval()


def snapshot_files(folder) -> dict[str, bytes]:
    """Every file under `folder` with its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def seed_of(nodeid: str) -> int:
    """A test's own seed: fixed by its id, so it does not depend on which tests ran before."""
    return zlib.crc32(nodeid.encode())


def seed_everything(seed: int) -> None:
    """Seeds torch (CPU and CUDA), numpy and `random`."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextlib.contextmanager
def isolated(seed: int = 0, threads: int | None = 1):
    """Runs the block with its own seeds and thread count, and puts the global torch /
    numpy / `random` state and the thread count back afterwards. For module-scoped
    fixtures, which run before (and outside) the per-test isolation below."""
    previous = torch.get_num_threads()
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            seed_everything(seed)
            if threads is not None:
                torch.set_num_threads(threads)
            yield
        finally:
            torch.set_num_threads(previous)
            np.random.set_state(np_state)
            random.setstate(py_state)


@pytest.fixture(autouse=True)
def _isolate_each_test(request):
    """Every test starts from seeds of its own and leaves the global RNG state, the
    thread count and the default dtype as it found them."""
    dtype = torch.get_default_dtype()
    with isolated(seed_of(request.node.nodeid), threads=None):
        yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def builtin_base(tmp_path_factory):
    """A folder holding the built-in base of `tiny_runs.tiny_raw` (200 warm-start steps),
    built once per session and shared by the CLI, trainer and reproducibility tests. Runs
    only read it (a config with another recipe adds its own `tiny-vla-<digest>/` beside)."""
    from tiny_runs import tiny_raw

    from lora_runtime.config import validate_config
    from lora_runtime.rl.actor_setup import ensure_builtin_base

    d = tmp_path_factory.mktemp("base")
    with isolated():
        ensure_builtin_base(validate_config(tiny_raw(d / "x", d)), log=lambda m: None)
    return d


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
