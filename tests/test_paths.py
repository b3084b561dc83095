"""One home for paths: every consumer of ``$FEDPRIV_HOME`` resolves it the same way, and an
empty value means the default ``~/.fedpriv`` (never the current directory)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fedpriv.common import checkpoint, rundir
from fedpriv.common.fileio import append_private
from fedpriv.common.ledger import load_or_create_signing_key
from fedpriv.server.privacy import signing_key_path


def _homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None) -> tuple[Path, Path]:
    user_home, cwd = tmp_path / "user", tmp_path / "cwd"
    user_home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(user_home))
    monkeypatch.chdir(cwd)
    for name in ("FEDPRIV_LEDGER_KEY", "FEDPRIV_CHECKPOINT_KEY", "FEDPRIV_CHECKPOINT_KEY_FILE"):
        monkeypatch.setenv(name, "")  # so that teardown restores what ensure_key() sets
        monkeypatch.delenv(name)
    if value is None:
        monkeypatch.delenv("FEDPRIV_HOME", raising=False)
    else:
        monkeypatch.setenv("FEDPRIV_HOME", value)
    return user_home, cwd


@pytest.mark.parametrize("value", ["", None])
def test_empty_or_unset_home_is_the_default_for_every_consumer(tmp_path, monkeypatch, value):
    user_home, cwd = _homes(tmp_path, monkeypatch, value)
    expected = user_home / ".fedpriv"
    # the ledger-signing key the server creates, the checkpoint key fedpriv simulate creates, and
    # the node state fedpriv node join defaults to
    load_or_create_signing_key(signing_key_path())
    checkpoint.ensure_key()
    assert (expected / "keys" / "ledger-signing.key").is_file()
    assert (expected / "keys" / "checkpoint.key").is_file()
    assert rundir.home_nodes_root() == expected / "nodes"
    assert list(cwd.iterdir()) == []  # nothing landed in the current directory


def test_set_home_is_used_by_every_consumer(tmp_path, monkeypatch):
    _homes(tmp_path, monkeypatch, str(tmp_path / "elsewhere"))
    load_or_create_signing_key(signing_key_path())
    checkpoint.ensure_key()
    keys = tmp_path / "elsewhere" / "keys"
    assert sorted(p.name for p in keys.iterdir()) == ["checkpoint.key", "ledger-signing.key"]
    for path in keys.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert rundir.home_nodes_root() == tmp_path / "elsewhere" / "nodes"


def test_append_private_creates_owner_only_and_appends(tmp_path):
    path = tmp_path / "sub" / "log.jsonl"
    append_private(path, b"a\n")
    append_private(path, b"b\n")
    assert path.read_bytes() == b"a\nb\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
