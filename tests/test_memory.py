"""`release_free_memory`: glibc's free pages go back to the OS after every RL iteration."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
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


def test_the_trainer_releases_after_every_step(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(trainer, "release_free_memory", lambda: calls.append(1) or True)
    run_cfg = validate_config(tiny_raw(tmp_path / "run", tmp_path / "base", steps=3))
    trainer.train(run_cfg, log=quiet)
    assert len(calls) == 3
