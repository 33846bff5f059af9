"""The `lora-runtime` command: help, train / inspect / merge / demo, Ctrl-C, and bad input
(exit status 2, one message naming the file or key, nothing on disk changed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from support.files import snapshot_files
from support.isolation import isolated
from support.numerics import rel_err
from support.tiny_runs import tiny_raw, write_demo_configs, write_yaml

from lora_runtime.cli import main
from lora_runtime.config import validate_config
from lora_runtime.rl.models import load_model_folder
from lora_runtime.rl.outputs import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_usage_error(capsys, argv, *patterns):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-runtime: error: ") and "Traceback" not in err
    assert "\n\n" not in err.strip()  # one paragraph
    for pattern in patterns:
        assert pattern in err, err
    return err


@pytest.mark.parametrize("command", ["train", "inspect", "merge", "export", "demo"])
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
    assert_usage_error(capsys, ["train", config, "--set", "runner.stepz=3"],
                       str(config), "runner.stepz: unknown key", "did you mean 'steps'")
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
    assert_usage_error(capsys, ["train", config], "runner.output_dir=", "cannot be created")


def test_existing_results_untouched(trained, capsys):
    config, out = trained
    before = snapshot_files(out)
    assert_usage_error(capsys, ["train", config], "already holds the results", "runner.overwrite=true")
    assert snapshot_files(out) == before


def test_inspect_shows_mode_modules_and_counts(tmp_path, trained, capsys):
    config, out = trained
    fresh = tmp_path / "fresh_base"
    assert main(["inspect", config, "--set", f"runner.base_dir={fresh}"]) == 0
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
    from lora_runtime.rl.actor_builder import build_actor

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


def steps_of(out_dir) -> list[dict]:
    """metrics.jsonl without the measured fields (times, memory)."""
    measured = {"step_time_s", "samples_per_s", "train_s", "rollout_s", "env_steps_per_s", "peak_memory_mb", "training_memory_mb"}
    return [{k: v for k, v in r.items() if k not in measured} for r in read_metrics(out_dir / "metrics.jsonl")]


def test_demo_runs_new_resume_full_and_compares(tmp_path, base_dir, capsys, monkeypatch):
    from lora_runtime.cli import demo

    configs = write_demo_configs(tmp_path / "configs", base_dir, new_steps=3)
    root = tmp_path / "out"
    assert main(["demo", "--configs", str(configs), "--output-root", str(root)]) == 0  # a process per run
    first = {name: steps_of(root / name) for name in demo.RUNS}

    def train_here(run) -> int:  # the same command line, in this process (saves 3 interpreter starts)
        with isolated():
            return main(["train", run.config, *[a for s in run.overrides for a in ("--set", s)]])

    monkeypatch.setattr(demo, "_train", train_here)
    (root / "full" / "metrics.jsonl").write_text("stale\n")
    assert main(["demo", "--configs", str(configs), "--output-root", str(root)]) == 0  # replaces the results
    assert {name: steps_of(root / name) for name in demo.RUNS} == first
    text = capsys.readouterr().out
    assert "demo: new -> resume -> full" in text and "final reward" in text
    assert "resume started at" in text
    assert text.count("total demo time") == 2  # once per demo, at its end
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
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "Traceback" not in err and f"stopped by SIGINT after step {summary['last_step']}: saved adapter/" in err
    assert summary["interrupted"] and 2 <= summary["steps_run"] < 100000
    state = json.loads((tmp_path / "out" / "train_state" / "meta.json").read_text())
    assert state["step"] == summary["last_step"]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------- bring your own model


@pytest.fixture(scope="module")
def qwen_tied(tmp_path_factory):
    pytest.importorskip("transformers", reason="needs transformers (test extra)")
    from support.hf_folders import causal_lm_folder

    return causal_lm_folder(str(tmp_path_factory.mktemp("qwen") / "base"), "qwen2", tie=True)


def test_merge_with_base_folder_unties_a_tied_head(tmp_path, qwen_tied, capsys):
    from support.hf_folders import logits, patched, token_batch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_runtime.adapters import save_adapter

    model = patched(load_model_folder(qwen_tied))
    save_adapter(model, tmp_path / "adapter")
    ids = token_batch()
    expected = logits(model.double(), ids)  # the unmerged model, float64
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--base", qwen_tied, "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(out))
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    got = logits(reloaded, ids).double()
    assert rel_err(got, expected) < 1e-5
    assert AutoTokenizer.from_pretrained(str(out), local_files_only=True).chat_template


@pytest.mark.parametrize(
    ("argv", "patterns"),
    [
        (["--adapter", "{tmp}/nonexist", "--base", "{base}"], ["merge --adapter", "nonexist does not exist"]),
        (["--adapter", "{tmp}/adapter", "--base", "{tmp}/nobase"], ["merge --base=", "nobase", "does not exist"]),
        (["--adapter", "{tmp}/adapter", "--base", "{tmp}/adapter"], ["merge --base=", "has no config.json"]),
        (["--adapter", "{tmp}/adapter", "--base", "{base}", "c.yaml"], ["--base", "not both"]),
        (["--adapter", "{tmp}/adapter"], ["no CONFIG or --base given", "--base DIR"]),
    ],
)
def test_merge_bad_paths_exit_2_before_any_work(tmp_path, qwen_tied, capsys, argv, patterns):
    from support.hf_folders import patched

    from lora_runtime.adapters import save_adapter

    save_adapter(patched(load_model_folder(qwen_tied)), tmp_path / "adapter")
    before = snapshot_files(tmp_path)
    argv = [a.format(tmp=tmp_path, base=qwen_tied) for a in argv]
    assert_usage_error(capsys, ["merge", *argv, "--out", str(tmp_path / "out")], *patterns)
    assert snapshot_files(tmp_path) == before and not (tmp_path / "out").exists()


def test_merge_adapter_of_another_model_exit_2(tmp_path, qwen_tied, trained, capsys):
    _, out = trained
    assert_usage_error(capsys, ["merge", "--adapter", str(out / "adapter"), "--base", qwen_tied, "--out", str(tmp_path / "m")],
                       "merge --adapter", "cannot load into this model", "does not adapt")
    assert not (tmp_path / "m").exists()


def test_rank_mismatch_message_has_no_unrelated_hint(tmp_path, trained, capsys):
    config, out = trained
    err = assert_usage_error(capsys, ["inspect", config, "--set", f"actor.model.lora_path={out / 'adapter'}",
                                      "--set", "actor.model.lora_rank=8"], "lora_rank=8", "set lora_rank: 4")
    assert "lora_path: null" not in err


def test_unexpected_failure_is_exit_2_without_traceback(tmp_path, trained, capsys, monkeypatch):
    from lora_runtime.cli import commands

    def boom(*args, **kwargs):
        raise RuntimeError("disk\non fire")

    monkeypatch.setattr(commands, "run_inspect", boom)
    config, _ = trained
    assert_usage_error(capsys, ["inspect", config], "inspect failed: RuntimeError: disk on fire")


@pytest.mark.parametrize(("output_dir", "base"), [("runs/run", "runs/base"), ("out", "out/base"), (".", "base")])
def test_default_base_dir_stays_inside_the_named_folders(tmp_path, monkeypatch, output_dir, base):
    from lora_runtime.rl.builtin_base import builtin_base_dir

    monkeypatch.chdir(tmp_path)
    raw = tiny_raw(output_dir, None)
    del raw["runner"]["base_dir"]
    folder = builtin_base_dir(validate_config(raw))
    assert os.path.dirname(folder) == str(tmp_path / base)


def test_unwritable_base_dir_is_reported_before_the_warm_start(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    config = write_yaml(tmp_path / "c.yaml", tiny_raw(tmp_path / "out", tmp_path / "f" / "base"))
    err = assert_usage_error(capsys, ["train", config], "runner.base_dir=", "cannot be created")
    assert "building the built-in base" not in err


# ----------------------------------------------------------------------------- export


def test_export_torchscript_of_the_trained_actor_runs_in_a_fresh_process(tmp_path, trained, capsys):
    from lora_runtime.ops import library_path
    from lora_runtime.rl.actor_builder import build_actor

    config, out = trained
    adapter = f"actor.model.lora_path={out / 'adapter'}"
    for merged in (False, True):
        path = tmp_path / f"actor{'-merged' if merged else ''}.pt"
        argv = ["export", config, "--set", adapter, "--format", "torchscript", "--out", str(path)]
        assert main(argv + (["--merged"] if merged else [])) == 0
        assert "wrote" in capsys.readouterr().out
        gen = torch.Generator().manual_seed(0)
        pixels, ids = torch.rand(3, 3, 8, 8, generator=gen), torch.randint(0, 24, (3, 4), generator=gen)
        torch.save((pixels, ids), tmp_path / "inputs.pt")
        lib = "" if merged else f"torch.ops.load_library({library_path()!r}); "
        code = (f"import sys, torch; {lib}m = torch.jit.load({str(path)!r}); "
                f"torch.save(m(*torch.load({str(tmp_path / 'inputs.pt')!r})), {str(tmp_path / 'out.pt')!r}); "
                "assert not [k for k in sys.modules if k.startswith('lora_runtime')]")
        done = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        run_cfg = validate_config(yaml.safe_load(Path(config).read_text()))
        run_cfg.actor.model.lora_path = str(out / "adapter")
        with torch.no_grad():
            expected = build_actor(run_cfg, log=lambda m: None).eval().double()(pixels.double(), ids)
        got = torch.load(tmp_path / "out.pt").double()
        assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize(
    ("extra", "patterns"),
    [
        (["--format", "torchscript", "--out", "{tmp}/a.pt2"], ["export --out", "must end with '.pt'"]),
        (["--format", "aoti", "--out", "{tmp}/nodir/a.pt2"], ["export --out", "does not exist"]),
        (["--format", "aoti", "--out", "{tmp}/c.yaml"], ["must end with '.pt2'"]),
        (["--format", "torchscript", "--out", "{tmp}/old.pt"], ["export --out", "old.pt' already exists"]),
        (["--format", "torchscript", "--out", "{tmp}/a.pt", "--set", "actor.model.lora_path=null"], ["lora_path is null", "nothing trained"]),
    ],
)
def test_export_bad_input_exit_2_and_writes_nothing(tmp_path, trained, capsys, extra, patterns):
    config, out = trained
    (tmp_path / "c.yaml").write_text(Path(config).read_text())
    (tmp_path / "old.pt").write_bytes(b"an earlier export")
    before = snapshot_files(tmp_path)
    argv = ["export", str(tmp_path / "c.yaml"), "--set", f"actor.model.lora_path={out / 'adapter'}"]
    assert_usage_error(capsys, argv + [a.format(tmp=tmp_path) for a in extra], *patterns)
    assert snapshot_files(tmp_path) == before


def test_outputs_inside_another_runs_results_are_refused(tmp_path, trained, base_dir, capsys):
    config, out = trained
    before = snapshot_files(out)
    adapter = str(out / "adapter")
    assert_usage_error(capsys, ["merge", "--adapter", adapter, "--out", str(out / "merged"), config],
                       "merge --out=", "inside the results of the run in")
    assert_usage_error(capsys, ["export", config, "--set", f"actor.model.lora_path={adapter}", "--format",
                                "torchscript", "--out", str(out / "adapter" / "a.pt")], "export --out=", "inside the results")
    nested = write_yaml(tmp_path / "n.yaml", tiny_raw(out / "nested", base_dir, steps=1))
    assert_usage_error(capsys, ["train", nested], "runner.output_dir=", "inside the results of the run in")
    assert snapshot_files(out) == before
