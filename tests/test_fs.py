"""`_fs`: files written whole or not at all, and JSON objects read back with errors that name
the file."""

from __future__ import annotations

import os
import re

import pytest

from lora_runtime._fs import (
    atomic_dir,
    atomic_file,
    read_json_object,
    remove_stale_staging,
    removed_on_error,
    write_bytes_atomic,
)


def test_atomic_file_replaces_the_file_only_on_success(tmp_path):
    target = tmp_path / "model.pt2"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer failed"), atomic_file(target, suffix=".pt2") as tmp:
        assert tmp.endswith(".pt2") and os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["model.pt2"]
    with atomic_file(target) as tmp, open(tmp, "wb") as f:
        f.write(b"new")
    assert target.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["model.pt2"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)


def test_write_bytes_atomic_writes_through_atomic_file(tmp_path):
    write_bytes_atomic(str(tmp_path / "a.bin"), b"\x00\x01")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01" and os.listdir(tmp_path) == ["a.bin"]


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", r"c\.json: not valid JSON \(Expecting property name"),
    ("[1, 2]", r"c\.json: expected a JSON object, got list"),
    ("\udcff", r"c\.json: not valid JSON"),
])
def test_read_json_object_names_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "c.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))}/{message}"):
        read_json_object(path)


def test_read_json_object_reads_an_object_and_leaves_a_missing_file_to_the_caller(tmp_path):
    (tmp_path / "c.json").write_text('{"r": 4, "alpha": [1]}')
    assert read_json_object(tmp_path / "c.json") == {"r": 4, "alpha": [1]}
    with pytest.raises(FileNotFoundError):
        read_json_object(tmp_path / "missing.json")


def test_written_files_and_folders_get_the_modes_of_a_plain_open(tmp_path, umask):
    import tempfile

    from support.files import modes

    write_bytes_atomic(str(tmp_path / "a.bin"), b"x")
    with atomic_dir(str(tmp_path / "new" / "folder")) as staging:
        with open(os.path.join(staging, "plain.json"), "w") as f:
            f.write("{}")
        fd, private = tempfile.mkstemp(dir=staging)  # a writer staging through its own temporary file
        os.close(fd)
        os.rename(private, os.path.join(staging, "weights.safetensors"))
        os.mkdir(os.path.join(staging, "sub"))
    f, d = 0o666 & ~umask, 0o777 & ~umask
    assert modes(tmp_path) == {"a.bin": f, "new/": d, "new/folder/": d, "new/folder/plain.json": f,
                               "new/folder/weights.safetensors": f, "new/folder/sub/": d}


def test_removed_on_error_removes_only_what_the_body_created(tmp_path):
    (tmp_path / "old").mkdir()
    with pytest.raises(RuntimeError), removed_on_error(str(tmp_path / "new" / "a" / "b"), str(tmp_path / "old" / "c")):
        (tmp_path / "new" / "a" / "b").mkdir(parents=True)
        (tmp_path / "old" / "c").mkdir()
        (tmp_path / "old" / "kept").mkdir()
        raise RuntimeError
    assert sorted(os.listdir(tmp_path)) == ["old"] and os.listdir(tmp_path / "old") == ["kept"]
    with removed_on_error(str(tmp_path / "ok")):
        (tmp_path / "ok").mkdir()
    assert (tmp_path / "ok").is_dir()


def test_remove_stale_staging_removes_the_hidden_folders_of_a_killed_writer(tmp_path):
    for name in (".adapter.writing-abc", ".model.old-x", ".keep", "adapter"):
        (tmp_path / name).mkdir()
    (tmp_path / ".f.writing-1").write_text("a file")
    removed = remove_stale_staging(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == [".adapter.writing-abc", ".model.old-x"]
    assert sorted(os.listdir(tmp_path)) == [".f.writing-1", ".keep", "adapter"]
