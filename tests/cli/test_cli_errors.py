"""Bad input to every command through a real `lora-runtime` process: exit status 2, one
paragraph on stderr naming the file / key / argument and the bad value, no traceback, and
the disk exactly as it was (nothing written, nothing half-written)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support.files import snapshot_files
from support.tiny_runs import tiny_raw, write_yaml


def cli(args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lora_runtime", *args], check=False, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def setup_case(tmp_path, case: str) -> tuple[list[str], list[str]]:
    """Writes the case's files under tmp_path; returns (argv, strings stderr must hold)."""
    raw = tiny_raw(tmp_path / "out", tmp_path / "base")
    if case == "train-every-problem-at-once":  # one error listing every problem
        raw["actor"]["model"]["lora_rnak"] = 8
        raw["trainer"]["steps"] = 0
        raw["task"]["grid"] = "big"
        cfg = write_yaml(tmp_path / "bad.yaml", raw)
        return ["train", cfg], [cfg, "actor.model.lora_rnak", "did you mean 'lora_rank'", "trainer.steps",
                                "task.grid"]
    if case == "train-missing-adapter":
        raw["actor"]["model"]["lora_path"] = str(tmp_path / "nowhere")
        cfg = write_yaml(tmp_path / "c.yaml", raw)
        return ["train", cfg], ["actor.model.lora_path", "nowhere"]
    if case == "inspect-bad-rank":
        cfg = write_yaml(tmp_path / "c.yaml", raw)
        return ["inspect", cfg, "--set", "actor.model.lora_rank=0"], ["actor.model.lora_rank", "0"]
    if case == "inspect-unknown-set-key":
        cfg = write_yaml(tmp_path / "c.yaml", raw)
        return ["inspect", cfg, "--set", "trainer.stpes=3"], ["trainer.stpes", "did you mean 'steps'"]
    if case == "merge-missing-adapter":
        cfg = write_yaml(tmp_path / "c.yaml", raw)
        return (["merge", "--adapter", str(tmp_path / "nowhere"), "--out", str(tmp_path / "merged"), cfg],
                ["merge --adapter", "nowhere"])
    if case == "merge-out-not-empty":
        (tmp_path / "merged").mkdir()
        (tmp_path / "merged" / "keep.txt").write_text("mine")
        _save_any_adapter(tmp_path / "adapter")  # valid, so the --out check is the one that refuses
        cfg = write_yaml(tmp_path / "c.yaml", raw)
        return (["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"), cfg],
                ["merge --out", "merged", "not an empty folder"])
    if case == "demo-missing-configs":
        return ["demo", "--configs", str(tmp_path / "noconfigs")], ["noconfigs", "--configs"]
    raise AssertionError(case)


def _save_any_adapter(directory) -> None:
    """A valid PEFT-layout adapter folder (of a one-layer model, non-zero B)."""
    import torch
    from torch import nn

    from lora_runtime.adapters import apply_lora, iter_lora_layers, save_adapter

    model = nn.Sequential(nn.Linear(8, 8))
    apply_lora(model, rank=2, target_modules=["0"])
    for _, layer in iter_lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight)
    save_adapter(model, directory)


CASES = ["train-every-problem-at-once", "train-missing-adapter", "inspect-bad-rank",
         "inspect-unknown-set-key", "merge-missing-adapter", "merge-out-not-empty", "demo-missing-configs"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_paragraph_and_changes_nothing(tmp_path, case):
    work = tmp_path / "work"
    work.mkdir()
    argv, patterns = setup_case(work, case)
    before = snapshot_files(tmp_path)
    dirs_before = sorted(p for p, _, _ in os.walk(tmp_path))
    proc = cli(argv, cwd=work)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    err = proc.stderr.strip()
    assert err.startswith("lora-runtime: error: "), err
    assert "Traceback" not in proc.stderr and "\n\n" not in err, err  # one paragraph
    for pattern in patterns:
        assert pattern in err, (pattern, err)
    assert proc.stdout == ""
    assert snapshot_files(tmp_path) == before  # no file written, changed or removed
    assert sorted(p for p, _, _ in os.walk(tmp_path)) == dirs_before  # and no folder created
