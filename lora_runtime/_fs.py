"""The one way this project writes to disk (atomically, synced, never half-written), and
reads the JSON files it wrote.

A file is written under a temporary name in its own folder, fsynced, and renamed over its
final name. A folder is written beside its final name, every file and the folder fsynced,
then swapped in with one atomic `renameat2(RENAME_EXCHANGE)` when the folder already
exists (Linux), or renamed in when it does not. So a process killed at any moment leaves
the final path holding either the previous complete content or the new complete content.
On a filesystem that cannot exchange, the old folder is moved aside for an instant first.

Files and folders get the permissions a plain `open()` / `os.mkdir()` would give them
(`0o666` / `0o777` less the umask), not the private `0o600` / `0o700` of the temporary
names they are written under: a serving process or another user can read the weights.
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
    "atomic_dir", "atomic_file", "check_writable", "dir_mode", "file_mode", "read_json_object", "remove_stale_staging",
    "removed_on_error", "write_bytes_atomic", "write_json_atomic", "write_text_atomic",
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


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (`/proc`)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore it (not thread-safe, but brief)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: `0o666` less the umask."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode `os.mkdir` gives a new folder: `0o777` less the umask."""
    return 0o777 & ~_umask()


def check_writable(folder: str) -> None:
    """Creates and removes a hidden file in `folder`: the one sure test that this process
    may write there (`os.access` says yes to root on a read-only mount or in `/proc`).

    Raises:
        OSError: the folder does not take a file (its `strerror` says why).
    """
    fd, probe = tempfile.mkstemp(prefix=".lora-runtime-probe-", dir=folder)
    os.close(fd)
    os.unlink(probe)


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
        os.chmod(tmp, file_mode())  # mkstemp made it 0o600
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


def _fix_modes(staging: str) -> None:
    """Gives the staging folder and what is inside the modes a plain write would give:
    mkdtemp made the folder 0o700, and writers that stage through temporary files of their
    own can leave 0o600 files: a file no one else may read gets the plain mode, others keep theirs."""
    files, dirs = file_mode(), dir_mode()
    os.chmod(staging, dirs)
    for root, subdirs, names in os.walk(staging):
        for name in subdirs:
            os.chmod(os.path.join(root, name), dirs)
        for name in names:
            path = os.path.join(root, name)
            if os.stat(path).st_mode & 0o077 == 0:
                os.chmod(path, files)


_STAGING_MARKERS = (".writing-", ".old-")


def remove_stale_staging(folder: str) -> list[str]:
    """Removes the hidden staging folders (`.<name>.writing-*`, `.<name>.old-*`) that
    `atomic_dir` leaves in `folder` when its process is killed (SIGKILL) mid-write.
    Call it only where no other process is writing into `folder` at the same time.

    Returns:
        The folders removed.
    """
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(folder, name)
        if name.startswith(".") and any(m in name for m in _STAGING_MARKERS) and os.path.isdir(path) \
                and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _topmost_missing(path: str) -> str | None:
    """The highest folder of `path` (itself included) that does not exist yet, or None."""
    path = os.path.abspath(path)
    if os.path.lexists(path):
        return None
    while not os.path.lexists(os.path.dirname(path)):
        path = os.path.dirname(path)
    return path


@contextlib.contextmanager
def removed_on_error(*paths: str, active: bool = True) -> Iterator[None]:
    """On an exception in the body, removes what the body created for `paths`: for each
    path that does not exist on entry, its topmost missing folder (so new parents go too).
    What existed before is never touched. `active=False` (ranks other than 0) removes nothing."""
    roots = {r for r in map(_topmost_missing, paths) if r is not None}
    try:
        yield
    except BaseException:
        if active:
            for root in sorted(roots):
                shutil.rmtree(root, ignore_errors=True)
        raise


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
        _fix_modes(staging)
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
