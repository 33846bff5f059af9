"""The `lora-runtime` command: help, train / inspect / merge / demo, Ctrl-C, and bad input
(exit status 2, one message naming the file or key, nothing on disk changed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import isolated, snapshot_files
from tiny_runs import tiny_raw, write_yaml

from lora_runtime.cli import main
from lora_runtime.config import validate_config
from lora_runtime.rl.actor_setup import ensure_builtin_base
from lora_runtime.rl.hf_loading import load_model_folder
from lora_runtime.rl.outputs import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    with isolated():
        ensure_builtin_base(validate_config(tiny_raw(d / "x", d)), log=lambda m: None)
    return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_dir):
    """A LoRA run made through the CLI: (config path, output dir)."""
    d = tmp_path_factory.mktemp("trained")
    config = write_yaml(d / "new.yaml", tiny_raw(d / "lora_new", base_dir, steps=4))
    with isolated():
        assert main(["train", config]) == 0
    return config, d / "lora_new"


def assert_usage_error(capsys, argv, *patterns):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-runtime: error: ") and "Traceback" not in err
    assert "\n\n" not in err.strip()  # one paragraph
    for pattern in patterns:
        assert pattern in err, err
    return err


@pytest.mark.parametrize("command", ["train", "inspect", "merge", "demo"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"usage: lora-runtime {command}" in capsys.readouterr().out


def test_top_level_and_bench_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("train", "inspect", "merge", "demo", "bench"))
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0


def test_train_writes_the_run(trained, capsys):
    _, out = trained
    assert {"adapter", "train_state", "metrics.jsonl", "summary.json", "config.yaml"} <= set(os.listdir(out))
    assert len(read_metrics(out / "metrics.jsonl")) == 4


def test_unknown_set_key(tmp_path, base_dir, capsys):
    config = write_yaml(tmp_path / "c.yaml", tiny_raw(tmp_path / "out", base_dir))
    assert_usage_error(capsys, ["train", config, "--set", "trainer.stepz=3"],
                       str(config), "trainer.stepz: unknown key", "did you mean 'steps'")
    assert not (tmp_path / "out").exists()


def test_missing_adapter(tmp_path, base_dir, capsys):
    config = write_yaml(tmp_path / "c.yaml", tiny_raw(tmp_path / "out", base_dir, mode="resume", lora_path=tmp_path / "nope"))
    assert_usage_error(capsys, ["train", config], f"{config}: actor.model.lora_path=", "does not exist", "lora_path: null")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("make", "message"), [(lambda p: None, "does not exist"), (lambda p: p.mkdir(), "has no config.json")])
def test_bad_model_path(tmp_path, base_dir, capsys, make, message):
    make(tmp_path / "model")
    raw = tiny_raw(tmp_path / "out", base_dir)
    raw["actor"]["model"]["model_path"] = str(tmp_path / "model")
    config = write_yaml(tmp_path / "c.yaml", raw)
    assert_usage_error(capsys, ["train", config], f"{config}: actor.model.model_path=", message)
    assert not (tmp_path / "out").exists()


def test_unwritable_output_dir(tmp_path, base_dir, capsys):
    (tmp_path / "f").write_text("x")
    config = write_yaml(tmp_path / "c.yaml", tiny_raw(tmp_path / "f" / "out", base_dir))
    assert_usage_error(capsys, ["train", config], "trainer.output_dir=", "cannot be created")


def test_existing_results_untouched(trained, capsys):
    config, out = trained
    before = snapshot_files(out)
    assert_usage_error(capsys, ["train", config], "already holds the results", "trainer.overwrite=true")
    assert snapshot_files(out) == before


def test_inspect_shows_mode_modules_and_counts(tmp_path, trained, capsys):
    config, out = trained
    fresh = tmp_path / "fresh_base"
    assert main(["inspect", config, "--set", f"trainer.base_dir={fresh}"]) == 0
    text = capsys.readouterr().out
    assert "mode:   new (new LoRA adapter, rank 4)" in text and "not built yet" in text
    assert "language_model.lm_head" in text and "vision.head.kv" in text
    assert "trainable params: " in text
    assert not fresh.exists()  # inspect writes nothing
    assert main(["inspect", config, "--set", f"actor.model.lora_path={out / 'adapter'}"]) == 0
    assert "mode:   resume" in capsys.readouterr().out
    assert main(["inspect", config, "--set", "actor.model.is_lora=false"]) == 0
    text = capsys.readouterr().out
    assert "modules (all trainable)" in text and "trainable%: 100.0000" in text


def test_merge_writes_a_model_folder_equal_to_base_plus_adapter(tmp_path, trained, capsys):
    from lora_runtime.rl.actor_setup import build_actor

    config, out = trained
    assert main(["merge", "--adapter", str(out / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert sorted(os.listdir(tmp_path / "merged")) == ["config.json", "model.safetensors"]
    merged = load_model_folder(str(tmp_path / "merged"))
    run_cfg = validate_config(yaml.safe_load((out / "config.yaml").read_text()))
    run_cfg.actor.model.lora_path = str(out / "adapter")
    patched = build_actor(run_cfg, log=lambda m: None).eval()
    gen = torch.Generator().manual_seed(0)
    pixels, ids = torch.rand(3, 3, 8, 8, generator=gen), torch.randint(0, 24, (3, 4), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(merged(pixels, ids), patched(pixels, ids), rtol=1e-5, atol=1e-5)
    before = snapshot_files(tmp_path / "merged")
    assert_usage_error(capsys, ["merge", "--adapter", str(out / "adapter"), "--out", str(tmp_path / "merged"), config],
                       "already exists and is not an empty folder")
    assert snapshot_files(tmp_path / "merged") == before
    assert_usage_error(capsys, ["merge", "--adapter", str(tmp_path), "--out", str(tmp_path / "m2"), config],
                       "merge --adapter", "adapter_config.json")
    assert not (tmp_path / "m2").exists()


def test_demo_runs_new_resume_full_and_compares(tmp_path, base_dir, capsys):
    configs = tmp_path / "configs"
    configs.mkdir()
    write_yaml(configs / "lora_new.yaml", tiny_raw("runs/lora_new", base_dir, steps=3))
    write_yaml(configs / "lora_resume.yaml", tiny_raw("runs/lora_resume", base_dir, mode="resume",
                                                      lora_path="runs/lora_new/adapter", steps=2))
    write_yaml(configs / "full.yaml", tiny_raw("runs/full", base_dir, mode="full", steps=2))
    root = tmp_path / "out"
    for _ in range(2):  # a second demo replaces the first one's results
        assert main(["demo", "--configs", str(configs), "--output-root", str(root)]) == 0
    text = capsys.readouterr().out
    assert "demo: new -> resume -> full" in text and "final reward" in text
    assert "resume started at" in text
    resumed = read_metrics(root / "lora_resume" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [4, 5]  # continued the new run's steps
    full = json.loads((root / "full" / "summary.json").read_text())
    assert full["mode"] == "full" and full["trainable_params"] == full["total_params"]


def test_ctrl_c_in_a_real_process(tmp_path, base_dir):
    config = write_yaml(tmp_path / "c.yaml", tiny_raw(tmp_path / "out", base_dir, steps=100000, progress=True))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lora_runtime", "train", config], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted after step" in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["interrupted"] and 2 <= summary["steps_run"] < 100000
    state = torch.load(tmp_path / "out" / "train_state" / "state.pt", weights_only=True)
    assert state["step"] == summary["last_step"]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
