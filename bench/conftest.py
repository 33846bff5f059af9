"""pytest-benchmark suite of lora-runtime: `pytest bench/` (not part of `make test`).

Each test times one variant with pytest-benchmark's own calibration; variants of one
configuration share a `benchmark.group`, so `--benchmark-group-by=group` prints them side
by side. The ratio table of the project (variants interleaved in one loop) comes from
`lora-runtime bench`; this suite is for pytest-benchmark's statistics, JSON and history
(`--benchmark-json`, `--benchmark-autosave`, `--benchmark-compare`).

Options: `--bench-device cpu|cuda` (default cpu), `--bench-threads N`.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lora-runtime bench")
    group.addoption("--bench-device", default="cpu", help="device of the benchmarks (cpu, cuda)")
    group.addoption("--bench-threads", type=int, default=None, help="torch.set_num_threads")


def pytest_configure(config: pytest.Config) -> None:
    threads = config.getoption("--bench-threads")
    if threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    dev = torch.device(pytestconfig.getoption("--bench-device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: torch sees no CUDA device")
    return dev


@pytest.fixture(scope="session")
def model_benches(device):
    """One `ModelBench` per model name, built on first use and shared by the session."""
    from lora_runtime.bench.model import ModelBench
    from lora_runtime.bench.specs import get_spec

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = ModelBench(get_spec(name), device)
        return cache[name]

    return get

