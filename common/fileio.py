"""Atomic and private file IO: every file fedpriv writes goes through these functions.

- :func:`write_atomic` replaces a file through a temporary file and a rename (fsynced, the
  directory too), so a crash never leaves a half-written file; the file is created 0600.
- :func:`create_private` creates a new owner-only (0600) file and never overwrites one.
- :func:`append_private` appends to an owner-only (0600) file, creating it if needed.
- :func:`write_json` writes JSON atomically, non-finite floats written as ``null``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

PRIVATE_FILE = 0o600


def json_safe(value: Any) -> Any:
    """Replace non-finite floats (JSON has none) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def fsync_directory(directory: Path) -> None:
    """Make a rename or a creation in ``directory`` survive a power loss (where the platform can)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # (platforms that cannot open a directory)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file (0600, from mkstemp) and rename, so a crash never leaves a
    half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)  # the rename itself survives a power loss
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_private(path: Path, data: bytes) -> None:
    """Create ``path`` (owner-only, 0600) holding ``data``, fsynced; FileExistsError if it is
    already there (never overwrites, even when another process creates it meanwhile)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_directory(path.parent)


def append_private(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path``, created owner-only (0600) when it is not there yet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE)
    with os.fdopen(fd, "ab") as handle:
        handle.write(data)


def write_json(path: Path, payload: Any) -> None:
    write_atomic(path, (json.dumps(json_safe(payload), indent=2, sort_keys=False) + "\n").encode())
