"""Reproducible runs from the command line: every run is its own process (torch seeds each
process at random), so these tests start `lora-runtime train` as a subprocess.

Two identical runs must write the same bytes (adapter or model, train_state, config) and
the same metrics; 3 steps and a resume run of 3 more must equal 6 steps in one go.
Timings (`step_time_s`, `samples_per_s`) and memory figures are measurements, not results:
they are the only fields left out of the comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from support.files import snapshot_files
from support.tiny_runs import tiny_raw, write_yaml

from lora_runtime.rl.outputs import read_metrics
from lora_runtime.rl.seeding import STREAMS, RunSeeds, derive_seed

MEASURED = {"step_time_s", "samples_per_s", "peak_memory_mb", "training_memory_mb"}
CLI_TIMEOUT_S = 300


def cli_train(tmp_path, name: str, raw: dict) -> tuple[int, str]:
    """`python -m lora_runtime train` on `raw` in a fresh process: exit code and stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONHASHSEED", None)
    proc = subprocess.run(
        [sys.executable, "-m", "lora_runtime", "train", write_yaml(tmp_path / f"{name}.yaml", raw)],
        check=False, capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT_S,
    )
    return proc.returncode, proc.stderr


def results(out) -> dict:
    """Everything a run wrote, with measurements and the output folder's own name left out."""
    files = snapshot_files(out)
    metrics = [{k: v for k, v in r.items() if k not in MEASURED} for r in read_metrics(out / "metrics.jsonl")]
    summary = {k: v for k, v in json.loads(files.pop("summary.json")).items() if k not in MEASURED}
    summary.pop("output_dir")
    files.pop("metrics.jsonl")
    files["config.yaml"] = files["config.yaml"].replace(str(out).encode(), b"OUT")
    return {"files": files, "metrics": metrics, "summary": summary}


def new_raw(out, base_dir, **trainer):
    """A new-mode run with LoRA dropout (its draws come from the seeded default generator)."""
    raw = tiny_raw(out, base_dir, **trainer)
    raw["actor"]["model"]["lora_dropout"] = 0.1
    return raw


def check_equal(a: dict, b: dict, steps: int) -> None:
    assert a["files"].keys() == b["files"].keys()
    for name in a["files"]:
        assert a["files"][name] == b["files"][name], name
    assert a["metrics"] == b["metrics"] and len(a["metrics"]) == steps
    assert a["summary"] == b["summary"]
    assert a["metrics"][-1]["kl"] > 0  # the runs trained (equal, not trivially empty)


def test_full_mode_cli_runs_are_bit_identical(tmp_path, base_dir):
    for name in "ab":
        rc, err = cli_train(tmp_path, name, tiny_raw(tmp_path / name, base_dir, mode="full", steps=3))
        assert rc == 0, err[-3000:]
    a, b = results(tmp_path / "a"), results(tmp_path / "b")
    assert "model/model.safetensors" in a["files"] and "train_state/meta.json" in a["files"]
    check_equal(a, b, 3)


def test_new_mode_cli_resume_equals_straight_run_bit_for_bit(tmp_path, base_dir):
    """3 steps, then `lora_path=<first>/adapter` for 3 more, write the same bytes as 6 steps
    in one go: each run in its own process, nothing shared but the files (so the adapter
    init, sampling and dropout streams are the same in every process)."""
    runs = {
        "straight": new_raw(tmp_path / "straight", base_dir, steps=6),
        "first": new_raw(tmp_path / "first", base_dir, steps=3),
        "second": new_raw(tmp_path / "second", base_dir, mode="resume", lora_path=tmp_path / "first" / "adapter", steps=3),
    }
    for name, raw in runs.items():
        rc, err = cli_train(tmp_path, name, raw)
        assert rc == 0, err[-3000:]
    assert f"continuing from {tmp_path / 'first' / 'train_state'} (optimizer, RNG) at step 3" in err
    straight, second = results(tmp_path / "straight"), results(tmp_path / "second")
    assert "adapter/adapter_model.safetensors" in straight["files"]
    assert results(tmp_path / "first")["metrics"] == straight["metrics"][:3]
    assert [r["step"] for r in second["metrics"]] == [4, 5, 6]
    assert second["metrics"] == straight["metrics"][3:]
    for name in straight["files"]:
        if name.startswith(("adapter/", "train_state/")) and name != "train_state/meta.json":
            assert second["files"][name] == straight["files"][name], name
    meta = [json.loads(r["files"]["train_state/meta.json"]) for r in (straight, second)]
    assert meta[0] == {**meta[1], "mode": "new"} and meta[1]["mode"] == "resume"


# ----------------------------------------------------------------------------- the seed streams


def test_streams_are_pure_functions_of_seed_stream_and_rank():
    torch.manual_seed(12345)  # the default generator's state must not matter
    a = {s: RunSeeds(7, rank=1).generator(s).initial_seed() for s in STREAMS}
    torch.manual_seed(54321)
    b = {s: RunSeeds(7, rank=1).generator(s).initial_seed() for s in STREAMS}
    assert a == b and len(set(a.values())) == len(STREAMS)
    assert RunSeeds(7, 0).generator("adapter_init").initial_seed() == a["adapter_init"]  # same on every rank
    assert RunSeeds(7, 0).generator("sampling").initial_seed() != a["sampling"]  # one stream per rank
    assert RunSeeds(8, 1).generator("sampling").initial_seed() != a["sampling"]
    assert derive_seed(7, "sampling", 1) == a["sampling"] < 2**63


def test_unknown_stream_is_refused():
    with pytest.raises(ValueError, match=r"stream='dropout'; allowed \['adapter_init', 'sampling', 'environment', 'global'\]"):
        RunSeeds(0).generator("dropout")


def test_seed_global_seeds_the_default_generator():
    RunSeeds(3, rank=1).seed_global()
    a = torch.rand(4)
    torch.manual_seed(0)
    RunSeeds(3, rank=1).seed_global()
    assert torch.equal(torch.rand(4), a)
    assert torch.initial_seed() == derive_seed(3, "global", 1)
