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
