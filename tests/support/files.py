"""The disk as a test sees it."""

from __future__ import annotations

import os


def snapshot_files(folder) -> dict[str, bytes]:
    """Every file under `folder` with its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def snapshot_tree(folder) -> dict[str, bytes | None]:
    """Every file (with its bytes) and every folder (None) under `folder`, hidden ones too."""
    out: dict[str, bytes | None] = dict(snapshot_files(folder))
    for root, dirs, _ in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), folder) + "/"] = None
    return out


def modes(folder) -> dict[str, int]:
    """The permission bits of every file and folder under `folder` (folders end in "/")."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = os.stat(path).st_mode & 0o777
        for name in dirs:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder) + "/"] = os.stat(path).st_mode & 0o777
    return out
