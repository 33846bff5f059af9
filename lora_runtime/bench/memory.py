"""Peak memory of one train-step variant, each in its own process.

The parent (`run_memory`) starts `python -m lora_runtime.bench --memory-variant NAME
--model MODEL --device DEVICE` once per variant; the child (`measure_memory`) prints one
JSON line. What the child measures:

1. imports torch, transformers, peft and lora_runtime, then reads its resident set:
   `baseline_mb` (the post-import baseline, the same for every variant);
2. builds the variant (model, adapters, optimizer; compiled variants are compiled by
   their first calls): `built_mb`;
3. runs `warmup` steps (the optimizer state is allocated by the first), resets the peak
   (CPU: returns freed heap pages to the OS with glibc's `malloc_trim`, then
   `/proc/self/clear_refs` = 5 resets VmHWM; CUDA: `reset_peak_memory_stats`), runs
   `steps` steps and reads the peak: `peak_mb`.

`peak_over_baseline_mb = peak_mb - baseline_mb` is what the train step costs: weights,
gradients, optimizer state, activations and temporaries (and, for a compiled variant, the
compiled code). The targets are checked on it. `warmup_peak_mb` (VmHWM before the reset)
also counts building, compiling and the warm-up steps. (`ru_maxrss` is not used: Linux
carries it over from the parent through fork and exec.) On CUDA the figures are `torch.cuda.memory_allocated` /
`max_memory_allocated` (the caching allocator's reserve is left out).

The children run with `MALLOC_MMAP_THRESHOLD_=131072` (see `CHILD_ENV`): with glibc's
adaptive default the resident set also holds freed blocks the heap keeps, and which ones
depends on the order of earlier allocations (a variant with many temporaries then looks
worse than it is, and repeated runs differ by tens of MiB).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time

import torch

__all__ = ["measure_memory", "run_memory"]

_MB = 2**20
# glibc serves blocks >= this size with mmap and unmaps them on free, so the resident set
# follows the live tensors instead of what the heap happens to keep cached (a fixed
# threshold: glibc's default raises it as blocks are freed, which makes RSS depend on the
# allocation history). The same for every variant.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc: best effort


def _trim_heap() -> None:
    """Returns freed heap pages to the OS (glibc `malloc_trim`), so that memory freed
    before the measured steps (model init, warm-up) is not counted as resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    """Resets the kernel's peak-RSS counter (Linux >= 4.0); False when it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory(model: str, variant: str, device: str = "cpu", warmup: int = 2,
                   steps: int = 2) -> dict:
    """Runs one train-step variant in this process and returns its memory figures (MiB).

    Args:
        model: a `bench_specs.MODEL_SPECS` name.
        variant: a `bench_model.TRAIN_VARIANTS` name.
        device: "cpu" or "cuda".
        warmup: steps before the peak is reset.
        steps: steps measured.

    Returns:
        A dict with `baseline_mb`, `built_mb`, `peak_mb`, `peak_over_baseline_mb`,
        `warmup_peak_mb` (CPU only), `method`, `variant`, `model`, `device`.
    """
    import transformers  # noqa: F401  (part of the baseline, whatever the variant)

    try:
        import peft  # noqa: F401
    except ImportError:
        pass
    from lora_runtime.bench.model import ModelBench  # deferred: measured after the baseline
    from lora_runtime.bench.specs import get_spec  # deferred: measured after the baseline

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    current = (lambda: torch.cuda.memory_allocated(dev) / _MB) if cuda else _rss_mb
    baseline = current()
    step = ModelBench(get_spec(model), dev).train_step(variant, fresh=False)
    built = current()
    warmup_peak = None
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        reset = True
    else:
        warmup_peak = _status_kb("VmHWM")  # build, compilation, first steps
        gc.collect()
        _trim_heap()
        reset = _reset_peak()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) / _MB
        method = "torch.cuda.max_memory_allocated over the measured steps"
    else:
        hwm = _status_kb("VmHWM") if reset else None
        peak = hwm / 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        method = ("VmHWM over the measured steps (reset by /proc/self/clear_refs)" if hwm
                  else "ru_maxrss (lifetime peak: the peak could not be reset)")
    out = {
        "model": model, "variant": variant, "device": str(dev), "method": method,
        "malloc_env": {k: os.environ.get(k) for k in CHILD_ENV},
        "baseline_mb": baseline, "built_mb": built, "peak_mb": peak,
        "peak_over_baseline_mb": peak - baseline, "warmup_steps": warmup, "steps": steps,
    }
    if not cuda and warmup_peak is not None:
        out["warmup_peak_mb"] = warmup_peak / 1024
    return out


def _child(model: str, variant: str, device: str, threads: int | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lora_runtime.bench", "--memory-variant", variant,
           "--model", model, "--device", device]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **CHILD_ENV}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _collect(proc: subprocess.Popen, timeout_s: float) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (err or out).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def run_memory(jobs: list[tuple[str, str]], device: str = "cpu", parallel: int = 1,
               threads: int | None = None, timeout_s: float = 600.0, log=print) -> dict:
    """Measures each `(model, variant)` in a fresh child process, `parallel` at a time.

    Peak memory does not depend on other processes, so children may run side by side (do
    it only after all timing is done). `threads` sets the children's torch threads.

    Returns:
        `{model: {variant: figures}}`; a child that failed gives `{"error": "..."}`.
    """
    results: dict[str, dict] = {}
    pending = list(jobs)
    running: list[tuple[str, str, subprocess.Popen, float]] = []
    while pending or running:
        while pending and len(running) < max(1, parallel):
            model, variant = pending.pop(0)
            running.append((model, variant, _child(model, variant, device, threads), time.perf_counter()))
        model, variant, proc, start = running.pop(0)  # oldest first
        res = _collect(proc, timeout_s)
        res["child_wall_s"] = time.perf_counter() - start
        results.setdefault(model, {})[variant] = res
        if "error" in res:
            log(f"  memory {model}/{variant}: failed ({res['error']})")
        else:
            log(f"  memory {model}/{variant}: peak {res['peak_mb']:.0f} MiB, over baseline "
                f"{res['peak_over_baseline_mb']:.0f} MiB ({res['child_wall_s']:.1f} s)")
    return results
