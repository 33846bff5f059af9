"""`release_free_memory`: glibc's free pages go back to the OS between RL iterations, when the
resident size grew by more than `RELEASE_GROWTH_BYTES` since the last release (`MemoryReleaser`)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch
from support.tiny_runs import quiet, tiny_raw

from lora_runtime import _memory
from lora_runtime.config import validate_config
from lora_runtime.rl import trainer

SCENARIO = """
import torch
from lora_runtime import _memory

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

big = torch.empty(16 << 20, dtype=torch.uint8)  # freeing it raises glibc's dynamic mmap threshold to 16 MiB
del big
parts = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(64)]  # 64 MiB in the heap, touched
keep = torch.ones(16, dtype=torch.uint8)  # allocated last: the heap's top stays in use
del parts
before = rss_kib()
released = _memory.release_free_memory()
print(released, before - rss_kib())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_freed_heap_pages_go_back_to_the_os():
    """64 MiB freed in 1 MiB tensors that glibc kept in its heap (in a fresh process, so the
    heap holds nothing else): the call gives more than 16 MiB of it back to the OS."""
    out = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True, text=True, check=True).stdout
    released, freed_kib = out.split()
    assert released == "True" and int(freed_kib) > 16 << 10, out


def test_without_malloc_trim_it_does_nothing(monkeypatch):
    monkeypatch.setattr(_memory, "_malloc_trim", lambda: None)
    assert _memory.release_free_memory() is False


def test_the_releaser_releases_when_the_resident_size_grew_past_the_margin(monkeypatch):
    calls, rss = [], [100]
    def release():
        calls.append(rss[0])
        rss[0] = 100  # the release gives the free pages back
        return True
    monkeypatch.setattr(_memory, "release_free_memory", release)
    releaser = _memory.MemoryReleaser(10, resident=lambda: rss[0])
    for size in (105, 110, 111, 104, 130, 100, 112):
        rss[0] = size
        releaser.after_iteration()
    assert calls == [111, 130, 112]  # more than 10 above the level after the last release
    assert _memory.MemoryReleaser().growth_bytes == _memory.RELEASE_GROWTH_BYTES == 16 << 20


def test_where_the_resident_size_is_unknown_it_releases_after_every_iteration(monkeypatch):
    calls = []
    monkeypatch.setattr(_memory, "release_free_memory", lambda: calls.append(1) or True)
    releaser = _memory.MemoryReleaser(resident=lambda: None)
    assert [releaser.after_iteration() for _ in range(3)] == [True, True, True] and len(calls) == 3


def test_resident_bytes_reads_this_process():
    rss = _memory.resident_bytes()
    if platform.system() == "Linux":
        assert rss is not None and 10 << 20 < rss < 64 << 30
        big = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
        assert _memory.resident_bytes() - rss > 48 << 20
        del big


@pytest.mark.parametrize(("growth", "releases"), [(0, 3), (1 << 40, 0)])
def test_the_trainer_releases_between_steps_by_the_margin(tmp_path, monkeypatch, growth, releases):
    calls = []
    monkeypatch.setattr(_memory, "release_free_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(_memory, "RELEASE_GROWTH_BYTES", growth)
    run_cfg = validate_config(tiny_raw(tmp_path / "run", tmp_path / "base", steps=3))
    trainer.train(run_cfg, log=quiet)
    assert len(calls) == releases
