"""The privacy ledger detects every kind of tampering the issue names."""

import base64
import json
import shutil

import dp_accounting
import pytest

from fedpriv.common.ledger import (
    HEAD, LEDGER, LedgerWriter, canonical, entry_hash, event_from_json, event_to_json, key_id,
    load_or_create_signing_key, verify_ledger,
)
from fedpriv.common.errors import FedprivError

EVENTS = [
    dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.08, dp_accounting.GaussianDpEvent(1.2)), 13),
    dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(0.5)),
    dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(2.0),
                                   dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0))]),
]


@pytest.fixture
def ledger_dir(tmp_path):
    key = load_or_create_signing_key(tmp_path / "keys" / "server.key")
    writer = LedgerWriter(tmp_path / "run", key)
    writer.append(actor="server", kind="run_start", parameters={"delta": 1e-5})
    writer.append(actor="client:0", kind="record_level", round=1, event=EVENTS[0], epsilon={"rdp": 1.5})
    writer.append(actor="server", kind="user_level", round=1, event=EVENTS[1], sampling="fixed", epsilon={"rdp": 0.7})
    return tmp_path / "run"


def test_events_roundtrip():
    for event in EVENTS:
        assert event_from_json(json.loads(json.dumps(event_to_json(event)))) == event


def test_untouched_ledger_verifies(ledger_dir):
    report = verify_ledger(ledger_dir)
    assert report.ok, report.failures
    assert [e["seq"] for e in report.entries] == [0, 1, 2]


def test_private_key_is_0600(tmp_path):
    load_or_create_signing_key(tmp_path / "k.pem")
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600


def test_flipping_any_byte_of_any_line_is_detected(ledger_dir):
    path = ledger_dir / LEDGER
    original = path.read_bytes()
    for position in range(len(original)):
        tampered = bytearray(original)
        tampered[position] ^= 0x01
        path.write_bytes(bytes(tampered))
        assert not verify_ledger(ledger_dir).ok, f"flip at byte {position} went unnoticed"
    path.write_bytes(original)
    assert verify_ledger(ledger_dir).ok


def test_deleting_any_line_is_detected(ledger_dir):
    path = ledger_dir / LEDGER
    lines = path.read_bytes().splitlines(keepends=True)
    for i in range(len(lines)):
        path.write_bytes(b"".join(lines[:i] + lines[i + 1:]))
        report = verify_ledger(ledger_dir)
        assert not report.ok
        assert "deleted" in report.failures[0] or "head" in report.failures[0]


def test_reordering_lines_is_detected(ledger_dir):
    path = ledger_dir / LEDGER
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[2] + lines[1])
    assert not verify_ledger(ledger_dir).ok


def test_entries_signed_by_another_key_are_detected(ledger_dir, tmp_path):
    # The attacker rebuilds the whole ledger with their own key, claiming a smaller epsilon.
    forged = tmp_path / "forged"
    writer = LedgerWriter(forged, load_or_create_signing_key(tmp_path / "attacker.key"))
    for entry in verify_ledger(ledger_dir).entries:
        writer.append(actor=entry["actor"], kind=entry["kind"], round=entry["round"],
                      event=event_from_json(entry["event"]) if entry["event"] else None,
                      epsilon={"rdp": 0.01} if entry["epsilon"] else None)
    shutil.copy(forged / LEDGER, ledger_dir / LEDGER)
    shutil.copy(forged / HEAD, ledger_dir / HEAD)
    report = verify_ledger(ledger_dir)  # ledger.pub beside it still holds the server's key
    assert not report.ok and "not the ledger key" in report.failures[0]



def test_one_entry_swapped_in_with_another_key_is_detected(ledger_dir, tmp_path):
    attacker = load_or_create_signing_key(tmp_path / "attacker.key")
    path = ledger_dir / LEDGER
    lines = path.read_bytes().splitlines(keepends=True)
    entry = json.loads(lines[-1])
    entry["epsilon"] = {"rdp": 0.01}
    entry["key_id"] = key_id(attacker.public_key())
    entry["hash"] = entry_hash(entry)  # prev_hash still chains to the genuine line before
    entry["signature"] = base64.b64encode(attacker.sign(bytes.fromhex(entry["hash"]))).decode()
    path.write_bytes(b"".join(lines[:-1]) + canonical(entry) + b"\n")
    report = verify_ledger(ledger_dir)
    assert not report.ok and "line 3: signed by key" in report.failures[0]


def test_truncation_and_head_tampering(ledger_dir):
    path = ledger_dir / LEDGER
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))
    report = verify_ledger(ledger_dir)
    assert not report.ok and "signed head records 3" in report.failures[0]
    path.write_bytes(b"".join(lines))
    (ledger_dir / HEAD).write_text('{"entries": 3}')
    assert not verify_ledger(ledger_dir).ok


def test_not_json_is_named(ledger_dir):
    (ledger_dir / LEDGER).write_text("this is not a ledger\n")
    report = verify_ledger(ledger_dir)
    assert report.failures == ["ledger line 1 is not valid JSON (altered or corrupt)"]


def test_writer_continues_a_valid_ledger_and_refuses_a_tampered_one(ledger_dir, tmp_path):
    key = load_or_create_signing_key(tmp_path / "keys" / "server.key")
    writer = LedgerWriter(ledger_dir, key)
    assert writer.seq == 3
    writer.append(actor="server", kind="run_end")
    assert verify_ledger(ledger_dir).ok and len(verify_ledger(ledger_dir).entries) == 4
    data = (ledger_dir / LEDGER).read_bytes()
    (ledger_dir / LEDGER).write_bytes(data.replace(b'"rdp":1.5', b'"rdp":0.5'))
    with pytest.raises(FedprivError, match="refusing to extend ledger"):
        LedgerWriter(ledger_dir, key)
    with pytest.raises(FedprivError, match="another key"):
        LedgerWriter(ledger_dir, load_or_create_signing_key(tmp_path / "other.key"))


# ---- a writer killed mid-append ---------------------------------------------------------------
def _kill_writer_before_head(directory, key_path):
    """A real SIGKILL: a fresh interpreter appends one entry and is killed as it is about to
    re-sign the head (the window between the fsynced append and the head)."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "import fedpriv.common.ledger as ledger\n"
        "def killed(path, data):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "writer = ledger.LedgerWriter(Path(sys.argv[1]), ledger.load_or_create_signing_key(Path(sys.argv[2])))\n"
        "ledger.write_atomic = killed\n"
        "writer.append(actor='client:1', kind='record_level', round=2, note='in flight')\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", script, str(directory), str(key_path)], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_a_writer_killed_before_the_head_leaves_a_ledger_reopening_repairs(ledger_dir, tmp_path):
    key_path = tmp_path / "keys" / "server.key"
    _kill_writer_before_head(ledger_dir, key_path)
    strict = verify_ledger(ledger_dir)
    assert not strict.ok and "appended without signing" in strict.failures[0]
    tolerant = verify_ledger(ledger_dir, crash_tail=True)
    assert tolerant.ok and tolerant.head_behind and len(tolerant.entries) == 4
    assert tolerant.entries[-1]["note"] == "in flight"  # the killed append is kept, not dropped
    writer = LedgerWriter(ledger_dir, load_or_create_signing_key(key_path))
    assert [e["kind"] for e in writer.existing][-1] == "record_level"
    repaired = verify_ledger(ledger_dir)
    assert repaired.ok, repaired.failures
    assert [e["kind"] for e in repaired.entries] == [
        "run_start", "record_level", "user_level", "record_level", "ledger_recovery"]
    assert "stopped before re-signing the ledger head" in repaired.entries[-1]["note"]


def test_a_torn_last_line_is_cut_off_kept_aside_and_recorded(ledger_dir, tmp_path):
    before = (ledger_dir / LEDGER).read_bytes()
    torn = before.splitlines()[1][: 150]  # half an entry, no newline: a write cut short
    (ledger_dir / LEDGER).write_bytes(before + torn)
    assert not verify_ledger(ledger_dir).ok
    assert verify_ledger(ledger_dir, crash_tail=True).torn_tail == torn
    LedgerWriter(ledger_dir, load_or_create_signing_key(tmp_path / "keys" / "server.key"))
    repaired = verify_ledger(ledger_dir)
    assert repaired.ok and len(repaired.entries) == 4
    assert (ledger_dir / LEDGER).read_bytes().startswith(before)
    assert (ledger_dir / "ledger.torn").read_bytes() == torn + b"\n"
    assert "torn, unterminated line of 150 bytes" in repaired.entries[-1]["note"]


def test_crash_tolerance_accepts_nothing_else(ledger_dir, tmp_path):
    ledger = ledger_dir / LEDGER
    lines = ledger.read_bytes().splitlines(keepends=True)
    # A deleted last entry: the head is ahead, not behind.
    ledger.write_bytes(b"".join(lines[:-1]))
    assert not verify_ledger(ledger_dir, crash_tail=True).ok
    # A torn line anywhere but at the end.
    ledger.write_bytes(lines[0] + lines[1][:100] + b"\n" + lines[2])
    assert not verify_ledger(ledger_dir, crash_tail=True).ok
    # A head two entries behind.
    ledger.write_bytes(b"".join(lines))
    head = (ledger_dir / HEAD).read_bytes()
    key = load_or_create_signing_key(tmp_path / "keys" / "server.key")
    writer = LedgerWriter(ledger_dir, key)
    writer.append(actor="client:1", kind="record_level", round=2)
    writer.append(actor="client:2", kind="record_level", round=2)
    (ledger_dir / HEAD).write_bytes(head)
    report = verify_ledger(ledger_dir, crash_tail=True)
    assert not report.ok and "appended without signing" in report.failures[0]
    with pytest.raises(FedprivError, match="refusing to extend"):
        LedgerWriter(ledger_dir, key)
    # An extra entry signed by another key is not a crash tail either.
    ledger.write_bytes(b"".join(lines))
    (ledger_dir / HEAD).write_bytes(head)
    other = LedgerWriter(tmp_path / "other", load_or_create_signing_key(tmp_path / "keys" / "other.key"))
    for _ in range(4):
        other.append(actor="x", kind="note")
    forged = (tmp_path / "other" / LEDGER).read_bytes().splitlines(keepends=True)[3]
    ledger.write_bytes(b"".join(lines) + forged)
    assert not verify_ledger(ledger_dir, crash_tail=True).ok
