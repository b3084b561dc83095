"""Atomic and private file IO: every file fedpriv writes goes through these functions.

- :func:`write_atomic` replaces a file through a temporary file and a rename (fsynced, the
  directory too), so a crash never leaves a half-written file; the file is created 0600.
- :func:`create_private` creates a new owner-only (0600) file and never overwrites one.
- :func:`append_private` appends to an owner-only (0600) file, creating it if needed.
- :func:`write_json` writes JSON atomically, non-finite floats written as ``null``.
- :func:`open_private` opens a file for appending or rewriting in place, owner-only.
- :func:`private_dir` creates a directory (and any missing parents) owner-only (0700).

Files and directories are owner-only whatever the process's umask: modes are set explicitly, not
left to the umask. No function here writes through a symbolic link: a link planted where fedpriv
writes is refused with a :class:`~common.errors.FedprivError` and its target is never opened
(``O_NOFOLLOW``; a rename replaces the path itself). A directory fedpriv finds already there must
belong to the user fedpriv runs as.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from fedpriv.common.errors import FedprivError

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
# The umask every fedpriv command runs under (fedpriv.cli.main), so that what the programs it starts
# write (Flower's SuperLink database and app installs, Ray's session files) is owner-only as well.
PRIVATE_UMASK = 0o077
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


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


def private_dir(path: Path) -> Path:
    """``path`` as a directory: created (with any missing parents) owner-only, 0700 whatever the
    umask; one already there must be a directory owned by this user (its mode is left as it is)."""
    path = Path(path)
    missing = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_DIR)
        except FileExistsError:
            continue  # another process made it meanwhile: checked below
        os.chmod(directory, PRIVATE_DIR)  # the umask may have taken bits off, never added them
    try:
        info = os.stat(path)
    except OSError as exc:
        raise FedprivError(f"cannot use directory {path}: {exc.strerror or exc}") from exc
    if not os.path.isdir(path):
        raise FedprivError(f"{path} is not a directory")
    _refuse_foreign(path, info, "use")
    return path


def _refuse_foreign(path: Path, info: os.stat_result, action: str) -> None:
    """A directory or file that belongs to another user is never written to."""
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise FedprivError(f"refusing to {action} {path}: it belongs to another user (uid {info.st_uid})")


def _refuse_link(path: Path) -> None:
    if os.path.islink(path):
        raise FedprivError(f"refusing to write {path}: it is a symbolic link")


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file (0600, from mkstemp) and rename, so a crash never leaves a
    half-written file. A symbolic link at ``path`` is refused (the rename would replace the link,
    never write its target, but a link there is not what fedpriv left)."""
    private_dir(path.parent)
    _refuse_link(path)
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
    private_dir(path.parent)
    _refuse_link(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, PRIVATE_FILE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_directory(path.parent)


_MODES = {"ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND, "r+b": os.O_RDWR}


def open_private(path: Path, mode: str = "ab") -> BinaryIO:
    """Open ``path`` for appending (``"ab"``, created owner-only when it is not there yet) or for
    rewriting in place (``"r+b"``), never through a symbolic link; a file fedpriv finds with wider
    permissions is narrowed to 0600 first."""
    path = Path(path)
    if mode == "ab":
        private_dir(path.parent)
    try:
        fd = os.open(path, _MODES[mode] | _NOFOLLOW, PRIVATE_FILE)
    except OSError:
        _refuse_link(path)  # O_NOFOLLOW's error, said in one line
        raise
    try:
        info = os.fstat(fd)
        _refuse_foreign(path, info, "write")
        if info.st_mode & 0o077:
            os.fchmod(fd, PRIVATE_FILE)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def append_private(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path``, created owner-only (0600) when it is not there yet."""
    with open_private(path, "ab") as handle:
        handle.write(data)


def write_json(path: Path, payload: Any) -> None:
    write_atomic(path, (json.dumps(json_safe(payload), indent=2, sort_keys=False) + "\n").encode())
