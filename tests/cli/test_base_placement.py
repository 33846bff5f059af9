"""Where the built-in base is, and who writes it (issue 23): only `train` writes a base, in
`runner.base_dir` or `base/` beside `runner.output_dir`; a command given an adapter (resume,
`eval`, `merge`, `export`) uses the base that adapter was trained on (its
`adapter_config.json` names it), wherever its own output goes; `eval`, `merge` and `export`
build a missing base in memory and leave nothing on disk but their own output. Checked with
snapshots of the whole tree before and after."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from support.files import snapshot_tree
from support.isolation import isolated
from support.tiny_episodic import tiny_episodic_raw
from support.tiny_runs import untrained_raw, write_yaml

from lora_runtime.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def default_base(raw):
    """`raw` with no `runner.base_dir`: the base goes where the default rule puts it."""
    del raw["runner"]["base_dir"]
    return raw


def new_differences(before, after):
    """Paths in `after` that were not in `before` (and paths whose bytes changed)."""
    return sorted(p for p in after if p not in before or after[p] != before[p])


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A new LoRA run in `<root>/a/new` with the default base (`<root>/a/base/`)."""
    root = tmp_path_factory.mktemp("placement")
    config = write_yaml(root / "new.yaml", default_base(untrained_raw(root / "a" / "new", None, steps=1)))
    with isolated():
        assert main(["train", config]) == 0
    bases = os.listdir(root / "a" / "base")
    assert len(bases) == 1
    return root, root / "a" / "new" / "adapter", root / "a" / "base" / bases[0]


def test_the_adapter_records_the_base_it_was_trained_on(first):
    _, adapter, base = first
    with open(adapter / "adapter_config.json", encoding="utf-8") as f:
        assert json.load(f)["base_model_name_or_path"] == str(base)


def test_resume_into_another_folder_reuses_the_adapters_base(first, tmp_path, capsys):
    _, adapter, base = first
    raw = default_base(untrained_raw(tmp_path / "b" / "resume", None, mode="resume", lora_path=adapter, steps=1))
    config = write_yaml(tmp_path / "resume.yaml", raw)
    before = snapshot_tree(tmp_path)
    with isolated():
        assert main(["train", config]) == 0
    created = new_differences(before, snapshot_tree(tmp_path))
    assert created and all(p.startswith(("b/", "b/resume")) for p in created), created
    assert not (tmp_path / "b" / "base").exists()  # before: a second base was built here
    with open(tmp_path / "b" / "resume" / "summary.json", encoding="utf-8") as f:
        assert json.load(f)["base"] == str(base)
    assert "building the built-in base" not in capsys.readouterr().err


def test_merge_with_a_config_naming_another_folder_writes_only_out(first, tmp_path, capsys):
    _, adapter, _ = first
    # the config's output_dir says tmp/c/new: its default base would be tmp/c/base
    raw = default_base(untrained_raw(tmp_path / "c" / "new", None))
    config = write_yaml(tmp_path / "c.yaml", raw)
    before = snapshot_tree(tmp_path)
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged"), config]) == 0
    created = new_differences(before, snapshot_tree(tmp_path))
    assert created and all(p.startswith("merged") for p in created), created
    assert "building the built-in base" not in capsys.readouterr().err


def test_merge_without_its_base_builds_it_in_memory_and_writes_only_out(first, tmp_path, capsys):
    root, _, base = first
    moved = shutil.copytree(root / "a" / "new", tmp_path / "run")  # the run without its base
    hidden = shutil.move(str(base), str(tmp_path / "hidden"))  # the recorded base is gone
    config = write_yaml(tmp_path / "c.yaml", default_base(untrained_raw(tmp_path / "d" / "new", None)))
    try:
        before = snapshot_tree(tmp_path)
        code = main(["merge", "--adapter", str(moved / "adapter"), "--out", str(tmp_path / "merged"), config])
        err = capsys.readouterr().err
        created = new_differences(before, snapshot_tree(tmp_path))
    finally:
        shutil.move(hidden, str(base))
    assert code == 0, err
    assert "in memory (not written" in err, err
    assert created and all(p.startswith("merged") for p in created), created
    assert not (tmp_path / "d").exists()  # before: the config's default base was built there
    assert sorted(os.listdir(root / "a" / "base")) == [base.name]  # and none beside the first one


def test_a_refused_merge_leaves_nothing(first, tmp_path, capsys):
    _, adapter, _ = first
    raw = default_base(untrained_raw(tmp_path / "e" / "new", None))
    raw["actor"]["builtin"]["text_dim"] = 48  # the adapter does not fit this base
    config = write_yaml(tmp_path / "e.yaml", raw)
    before = snapshot_tree(tmp_path)
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "x" / "merged"), config]) == 2
    err = capsys.readouterr().err
    assert "merge --adapter" in err, err
    assert snapshot_tree(tmp_path) == before


def test_eval_and_export_leave_nothing_but_their_output(tmp_path, capsys):
    raw = default_base(tiny_episodic_raw(tmp_path / "runs" / "new", None, steps=1))
    config = write_yaml(tmp_path / "new.yaml", raw)
    with isolated():
        assert main(["train", config]) == 0
    adapter = tmp_path / "runs" / "new" / "adapter"
    other = default_base(tiny_episodic_raw(tmp_path / "elsewhere" / "new", None, steps=1))
    other_config = write_yaml(tmp_path / "other.yaml", other)
    before = snapshot_tree(tmp_path)
    with isolated():
        assert main(["eval", other_config, "--episodes", "2", "--adapter", str(adapter)]) == 0
        assert main(["eval", other_config, "--episodes", "2"]) == 0  # no base there: built in memory
        assert main(["export", other_config, "--set", f"actor.model.lora_path={adapter}", "--format",
                     "torchscript", "--out", str(tmp_path / "actor.pt")]) == 0
    err = capsys.readouterr().err
    assert new_differences(before, snapshot_tree(tmp_path)) == ["actor.pt"]
    assert err.count("in memory (not written") == 1, err  # the adapter's own base was found each time
