"""Every file a run, a save, a merge or an export writes can be read by a serving process
or another user as a plain `open()` would allow: `0o666` / `0o777` less the umask, never the
private 0o600 / 0o700 of the temporary names they are written under."""

from __future__ import annotations

import os

import pytest
from support.files import modes
from support.isolation import isolated
from support.tiny_runs import quiet, tiny_raw, untrained_raw, write_yaml

from lora_runtime.cli import main
from lora_runtime.config import validate_config
from lora_runtime.rl.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_plain_modes(folder, umask):
    found = modes(folder)
    assert found, folder
    want = {p: (0o777 if p.endswith("/") else 0o666) & ~umask for p in found}
    assert {p: oct(m) for p, m in found.items()} == {p: oct(m) for p, m in want.items()}


def test_new_base_adapter_full_model_and_merge_get_plain_modes(tmp_path, umask, capsys):
    raws = [untrained_raw(tmp_path / "runs" / "new", None, steps=2),
            untrained_raw(tmp_path / "runs" / "full", None, mode="full", steps=2)]
    for raw in raws:
        del raw["runner"]["base_dir"]  # the default: runs/base, built here
    with isolated():
        new, full = (train(validate_config(raw), log=quiet) for raw in raws)
    assert os.path.isfile(os.path.join(new.output_dir, "adapter", "adapter_model.safetensors"))
    assert os.path.isfile(os.path.join(full.output_dir, "model", "model.safetensors"))
    assert main(["merge", "--adapter", new.output_dir + "/adapter", "--out", str(tmp_path / "merged")]) == 0
    assert os.path.isfile(tmp_path / "merged" / "model.safetensors")
    assert os.path.isdir(tmp_path / "runs" / "base")
    assert_plain_modes(tmp_path, umask)  # runs/base (the built base), both runs, the merged model
    capsys.readouterr()


def test_a_trained_run_with_plots_has_plain_modes(tmp_path, base_dir, umask):
    raw = tiny_raw(tmp_path / "run", base_dir, steps=2, plot=True, save_every=1)
    with isolated():
        train(validate_config(raw), log=quiet)
    assert_plain_modes(tmp_path / "run", umask)


def test_export_file_has_a_plain_mode(tmp_path, base_dir, umask, capsys):
    config = write_yaml(tmp_path / "c.yaml", untrained_raw(tmp_path / "run", base_dir, steps=1))
    with isolated():
        assert main(["train", config]) == 0
        assert main(["export", config, "--set", f"actor.model.lora_path={tmp_path / 'run' / 'adapter'}",
                     "--format", "torchscript", "--out", str(tmp_path / "actor.pt")]) == 0
    assert oct(os.stat(tmp_path / "actor.pt").st_mode & 0o777) == oct(0o666 & ~umask)
    capsys.readouterr()
