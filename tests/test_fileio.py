"""Private by default: what fedpriv writes is owner-only whatever the umask, and no write goes
through a symbolic link planted where fedpriv writes (common.fileio, and the ledger on it)."""

from __future__ import annotations

import os
import re
import stat

import pytest

from fedpriv.common import fileio
from fedpriv.common.errors import FedprivError
from fedpriv.common.ledger import LedgerWriter, load_or_create_signing_key

WRITERS = {
    "write_atomic": lambda path: fileio.write_atomic(path, b"new"),
    "create_private": lambda path: fileio.create_private(path, b"new"),
    "append_private": lambda path: fileio.append_private(path, b"new"),
    "open_private ab": lambda path: fileio.open_private(path, "ab").close(),
    "open_private r+b": lambda path: fileio.open_private(path, "r+b").close(),
}


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_directories_and_files_are_owner_only_under_umask_022(tmp_path, loose_umask):
    nested = tmp_path / "a" / "b" / "c"
    fileio.write_atomic(nested / "one", b"1")
    fileio.create_private(nested / "two", b"2")
    fileio.append_private(tmp_path / "d" / "three", b"3")
    fileio.write_json(tmp_path / "e" / "four.json", {"x": 1})
    for directory in (tmp_path / "a", tmp_path / "a" / "b", nested, tmp_path / "d", tmp_path / "e"):
        assert mode(directory) == 0o700, directory
    for file in (nested / "one", nested / "two", tmp_path / "d" / "three", tmp_path / "e" / "four.json"):
        assert mode(file) == 0o600, file
    assert fileio.private_dir(nested) == nested


def test_a_file_found_with_wider_permissions_is_narrowed_when_appended_to(tmp_path, loose_umask):
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b"old\n")
    os.chmod(path, 0o644)
    fileio.append_private(path, b"new\n")
    assert mode(path) == 0o600 and path.read_bytes() == b"old\nnew\n"


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_a_symlink_planted_where_fedpriv_writes_is_refused_and_its_target_untouched(tmp_path, writer, dangling):
    target = tmp_path / "elsewhere" / "target"
    target.parent.mkdir()
    if not dangling:
        target.write_bytes(b"precious")
        os.chmod(target, 0o644)
        before = os.stat(target)
    path = tmp_path / "state" / "file"
    path.parent.mkdir()
    path.symlink_to(target)
    with pytest.raises(FedprivError, match="symbolic link"):
        WRITERS[writer](path)
    assert path.is_symlink()  # left as it was
    if dangling:
        assert not target.exists()
    else:
        after = os.stat(target)
        assert target.read_bytes() == b"precious"
        assert (after.st_mode, after.st_mtime_ns, after.st_size) == (before.st_mode, before.st_mtime_ns, before.st_size)


def test_the_ledger_refuses_a_planted_ledger_symlink(tmp_path):
    """A dangling ``ledger.jsonl`` link once made fedpriv create a file at its target."""
    key = load_or_create_signing_key(tmp_path / "keys" / "ledger.key")
    run = tmp_path / "run"
    run.mkdir()
    target = tmp_path / "outside.jsonl"
    (run / "ledger.jsonl").symlink_to(target)
    with pytest.raises(FedprivError, match="symbolic link"):
        LedgerWriter(run, key).append(actor="server", kind="run_start", parameters={})
    assert not target.exists()


def test_the_ledger_and_its_key_are_owner_only_under_umask_022(tmp_path, loose_umask):
    key = load_or_create_signing_key(tmp_path / "home" / "keys" / "ledger.key")
    writer = LedgerWriter(tmp_path / "home" / "runs" / "run", key)
    writer.append(actor="server", kind="run_start", parameters={})
    for path in (tmp_path / "home").rglob("*"):
        assert mode(path) == (0o700 if path.is_dir() else 0o600), path


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give a directory away")
def test_a_state_directory_of_another_user_is_refused(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    with pytest.raises(FedprivError, match="another user"):
        fileio.write_atomic(state / "file", b"x")
    assert not (state / "file").exists()


# Writes outside common/fileio.py, each into a directory the same code has just made with mkdtemp
# (private, fresh: nothing can be planted in it): the app snapshot fedpriv server run signs, the app
# gate's launcher script, and the Keras file fedpriv model export reads back before writing it.
FRESH_DIRECTORY_WRITES = {
    ("common/appsign.py", "target.write_bytes("),
    ("clients/app_gate.py", "path.write_text("),
    ("fedpriv/model_cmd.py", "model.save(path)"),
}
WRITE_CALL = re.compile(r"(\w+\.write_text\(|\w+\.write_bytes\(|\bopen\([^)]*['\"][wax]b?\+?['\"]|np\.save\w*\(\s*(?!buffer)\w|"
                        r"\w+\.save\(path\)|savefig\((?!buffer))")


def test_product_code_writes_files_only_through_fileio():
    """So every file fedpriv writes or appends to gets the symlink refusal tested above: no module
    but common/fileio.py opens a file for writing, except the writes into fresh directories above."""
    from tests.conftest import ROOT

    found = set()
    for package in ("common", "server", "clients", "simulations", "fedpriv"):
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative == "common/fileio.py":
                continue
            for line in path.read_text().splitlines():
                for match in WRITE_CALL.finditer(line):
                    if "os.devnull" not in line:
                        found.add((relative, match.group(0)))
    assert found == FRESH_DIRECTORY_WRITES, found - FRESH_DIRECTORY_WRITES or FRESH_DIRECTORY_WRITES - found
