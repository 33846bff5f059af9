"""A refused `train` is refused before the warm start (the slow part) and leaves the disk as
it found it: no file and no folder created (the built-in base and new parent folders
included), checked with a snapshot of the whole tree."""

from __future__ import annotations

import pytest
from support.files import snapshot_tree
from support.tiny_runs import untrained_raw, write_yaml

from lora_runtime.cli import main
from lora_runtime.rl import trainer
from lora_runtime.rl.tasks.reach import ReachTask

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_warm_start(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the warm start ran")

    monkeypatch.setattr(ReachTask, "warm_start", refuse)


def refused(tmp_path, capsys, raw, *patterns):
    """Runs `train` on `raw` (no base_dir: the default base beside the output) in `tmp_path`."""
    del raw["runner"]["base_dir"]
    config = write_yaml(tmp_path / "c.yaml", raw)
    before = snapshot_tree(tmp_path)
    assert main(["train", config]) == 2
    err = capsys.readouterr().err
    assert snapshot_tree(tmp_path) == before, "a refused run changed the disk"
    assert "warm start ran" not in err and "building the built-in base" not in err, err
    for pattern in patterns:
        assert pattern in err, err
    return err


def test_rank_mismatch_is_refused_before_the_base_is_built(tmp_path, trained, capsys, no_warm_start):
    raw = untrained_raw(tmp_path / "new" / "out", None, mode="resume", lora_path=trained[1] / "adapter")
    raw["actor"]["model"]["lora_rank"] = 8
    refused(tmp_path, capsys, raw, "lora_rank=8", "set lora_rank: 4")


@pytest.mark.parametrize("key", ["output_dir", "base_dir"])
def test_an_unwritable_folder_is_named_by_its_key(tmp_path, capsys, no_warm_start, key):
    raw = untrained_raw(tmp_path / "new" / "out", None)
    raw["runner"][key] = "/proc/lr/out"
    if key == "base_dir":
        config = write_yaml(tmp_path / "c.yaml", raw)
        before = snapshot_tree(tmp_path)
        assert main(["train", config]) == 2
        err = capsys.readouterr().err
        assert snapshot_tree(tmp_path) == before
    else:
        err = refused(tmp_path, capsys, raw)
    assert f"runner.{key}='/proc/lr/out" in err and "is not writable" in err and "Free space" not in err, err


def test_a_failure_after_the_base_was_built_leaves_nothing(tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise trainer.UsageError("refused after the base")

    monkeypatch.setattr(trainer, "Reference", fail)
    raw = untrained_raw(tmp_path / "new" / "out", None)
    del raw["runner"]["base_dir"]
    config = write_yaml(tmp_path / "c.yaml", raw)
    before = snapshot_tree(tmp_path)
    assert main(["train", config]) == 2
    assert "refused after the base" in capsys.readouterr().err
    assert snapshot_tree(tmp_path) == before  # not even new/base/
