"""The one way this project writes to disk (atomically, synced, never half-written), and
reads the JSON files it wrote.

A file is written under a temporary name in its own folder, fsynced, and renamed over its
final name. A folder is written beside its final name, every file and the folder fsynced,
then swapped in with one atomic `renameat2(RENAME_EXCHANGE)` when the folder already
exists (Linux), or renamed in when it does not. So a process killed at any moment leaves
the final path holding either the previous complete content or the new complete content.
On a filesystem that cannot exchange, the old folder is moved aside for an instant first.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

__all__ = [
    "atomic_dir", "atomic_file", "read_json_object", "write_bytes_atomic", "write_json_atomic",
    "write_text_atomic",
]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_NO_EXCHANGE = (22, 38, 95)  # EINVAL, ENOSYS, EOPNOTSUPP: the filesystem cannot exchange


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), b)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yields a temporary file's path in `path`'s folder for any writer to fill (it exists,
    empty); on success the file is fsynced and renamed over `path`, on an exception removed.

    Args:
        path: the final file.
        suffix: the end of the temporary name, for writers that check it (e.g. ".pt2").
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        _fsync_path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Writes `data` to `path` through a synced temporary file in the same folder."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text_atomic(path: str, text: str) -> None:
    """`write_bytes_atomic` of UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, obj: Any) -> None:
    """`obj` as indented, key-sorted JSON with a final newline, written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object stored in `path`.

    Raises:
        OSError: the file cannot be opened (FileNotFoundError when there is none).
        ValueError: the file is not UTF-8 JSON, or holds another JSON value than an object;
            the message starts with the file's path and says which.
    """
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{os.fspath(path)}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):  # a bad file, not a bad argument: ValueError, as for bad JSON
        kind = type(value).__name__
        raise ValueError(f"{os.fspath(path)}: expected a JSON object, got {kind}")  # noqa: TRY004
    return value


@contextlib.contextmanager
def atomic_dir(target: str) -> Iterator[str]:
    """Yields an empty staging folder beside `target`; on success it replaces `target`.

    Every file written into the staging folder is fsynced before the swap, and the parent
    folder after it. On an exception the staging folder is removed and `target` is
    untouched. Parents of `target` are created.

    Yields:
        The staging folder's path (write the new content there).
    """
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging: str | None = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.writing-", dir=parent)
    try:
        yield staging
        for root, _, files in os.walk(staging):
            for name in files:
                _fsync_path(os.path.join(root, name))
        os.chmod(staging, 0o755)
        _fsync_path(staging)
        if not os.path.lexists(target):
            os.rename(staging, target)
            staging = None
        elif not _exchange(staging, target):  # no atomic exchange: move the old one aside
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(target, old)
            os.rename(staging, target)
            staging = old
        _fsync_path(parent)
    finally:  # after an exchange, `staging` holds the previous content
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
