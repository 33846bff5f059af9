"""`lora-runtime demo` runs full fine-tuning alongside new -> resume: the order, the log file,
failures of either run, and Ctrl-C reaching both.

The three runs are stand-in processes (a few lines of Python, in place of `lora-runtime
train`) that leave marker files, so these tests check the demo's orchestration in about a
second; test_cli's demo test runs the real trains.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from support.tiny_runs import write_demo_configs

from lora_runtime.cli import demo

# argv: name, marker folder, what to do. Leaves started-<name>, then done-<name> / saved-<name> / term-<name>.
FAKE = r"""
import os, signal, sys, time
name, folder, action = sys.argv[1:4]
def mark(what):
    open(os.path.join(folder, f"{what}-{name}"), "w").close()
def on_signal(code, what):
    def handler(*_):
        mark(what)
        sys.exit(code)
    return handler
signal.signal(signal.SIGINT, on_signal(130, "saved"))
signal.signal(signal.SIGTERM, on_signal(143, "term"))
mark("started")
print(f"{name} trains", flush=True)
kind, _, arg = action.partition(":")
code = 0
if kind == "exit":
    code = int(arg)
elif kind == "needs-done":  # exits 6 unless run `arg` has ended well
    code = 0 if os.path.exists(os.path.join(folder, f"done-{arg}")) else 6
elif kind in ("wait-for", "fail-after"):  # waits for run `arg` to start (3 if it never does), then 0 / 2
    deadline = time.time() + 60
    while time.time() < deadline and not os.path.exists(os.path.join(folder, f"started-{arg}")):
        time.sleep(0.02)
    code = (0 if kind == "wait-for" else 2) if time.time() < deadline else 3
else:  # "sleep": until a signal
    time.sleep(60)
    code = 4
if code == 0:
    mark("done")
sys.exit(code)
"""


@pytest.fixture
def configs(tmp_path, base_dir):
    return write_demo_configs(tmp_path / "configs", base_dir)


def fake(monkeypatch, marks, actions: dict[str, str]) -> list[str]:
    """Replaces each run's command with FAKE; returns the list the comparison table appends to."""
    marks.mkdir(exist_ok=True)
    monkeypatch.setattr(demo, "_command", lambda run: [sys.executable, "-c", FAKE, run.name, str(marks), actions[run.name]])
    tables: list[str] = []
    monkeypatch.setattr(demo, "print_comparison", lambda runs: tables.extend(r.name for r in runs))
    return tables


def test_full_runs_alongside_new_then_resume_with_its_output_in_a_log(tmp_path, configs, monkeypatch, capfd):
    marks = tmp_path / "marks"
    # new ends only once full has started, full only once resume has: full runs next to new -> resume
    tables = fake(monkeypatch, marks, {"lora_new": "wait-for:full", "lora_resume": "needs-done:lora_new",
                                       "full": "wait-for:lora_resume"})
    root = tmp_path / "out"
    assert demo.run_demo(str(configs), str(root)) == 0
    assert set(os.listdir(marks)) == {f"{m}-{n}" for m in ("started", "done") for n in demo.RUNS}
    assert tables == list(demo.RUNS)  # the table has all three rows, in the usual order
    out = capfd.readouterr().out
    log = root / "full" / demo.LOG_NAME
    assert f"=== full (alongside, output in {log})" in out
    assert "full trains" not in out and "lora_new trains" in out and "lora_resume trains" in out
    assert log.read_text() == "full trains\n"
    assert out.index("=== full") < out.index("=== lora_new") < out.index("=== lora_resume")


def test_a_failing_new_run_stops_full_and_skips_resume(tmp_path, configs, monkeypatch, capfd):
    marks = tmp_path / "marks"
    tables = fake(monkeypatch, marks, {"lora_new": "fail-after:full", "lora_resume": "exit:0", "full": "sleep"})
    assert demo.run_demo(str(configs), str(tmp_path / "out")) == 2
    assert not (marks / "started-lora_resume").exists() and not tables
    assert (marks / "term-full").exists()  # full was asked to stop (SIGTERM: a real run saves) and waited for
    err = capfd.readouterr().err
    assert "lora_new stopped with exit status 2; later runs skipped" in err
    assert f"full stopped with exit status 143; its output is in {tmp_path / 'out' / 'full' / demo.LOG_NAME}" in err


def test_a_failing_full_run_fails_the_demo_with_its_status(tmp_path, configs, monkeypatch, capfd):
    marks = tmp_path / "marks"
    tables = fake(monkeypatch, marks, {"lora_new": "exit:0", "lora_resume": "exit:0", "full": "exit:5"})
    assert demo.run_demo(str(configs), str(tmp_path / "out")) == 5
    assert not tables and (marks / "started-lora_resume").exists()
    log = tmp_path / "out" / "full" / demo.LOG_NAME
    assert f"full stopped with exit status 5; its output is in {log}" in capfd.readouterr().err


def test_an_unwritable_log_folder_is_refused_before_any_run(tmp_path, configs, monkeypatch):
    marks = tmp_path / "marks"
    fake(monkeypatch, marks, {"lora_new": "exit:0", "lora_resume": "exit:0", "full": "exit:0"})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "full").write_text("a file where the run folder goes")
    with pytest.raises(demo.UsageError, match=r"demo: cannot write .*full/train\.log .*--output-root"):
        demo.run_demo(str(configs), str(tmp_path / "out"))
    assert not os.listdir(marks)


DRIVER = r"""
import sys
from lora_runtime.cli import demo
fake, marks, configs, root = sys.argv[1:5]
actions = {"lora_new": "sleep", "lora_resume": "exit:0", "full": "sleep"}
demo._command = lambda run: [sys.executable, "-c", fake, run.name, marks, actions[run.name]]
sys.exit(demo.run_demo(configs, root))
"""


def test_ctrl_c_reaches_both_runs_and_each_saves(tmp_path, configs):
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, FAKE, str(marks), str(configs), str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all((marks / f"started-{n}").exists() for n in ("lora_new", "full")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert (marks / "saved-lora_new").exists() and (marks / "saved-full").exists()
    assert not (marks / "started-lora_resume").exists()
    assert "Traceback" not in err
