"""The privacy ledger: an append-only, hash-chained, Ed25519-signed JSONL record of every spend.

Each line is one entry, written as canonical JSON (sorted keys, no spaces). An entry holds:

- ``seq`` (0, 1, 2, ...), ``time`` (UTC), ``round``, ``actor`` (``server``, ``client:<id>``) and
  ``kind`` (``run_start``, ``record_level``, ``record_level_carried``, ``user_level``,
  ``refusal``, ``round_failed``, ``budget_stop``, ``run_end``, and ``run_resume`` where a run
  continues from its checkpoint in a new server process): the vocabulary is
  :mod:`common.ledger_schema`, and :func:`common.replay.replay` is the one reading of entries;
- ``event``: the mechanism as a serialised dp-accounting ``DpEvent`` (or null), with
  ``parameters`` and ``sampling`` spelled out for people;
- ``epsilon``: the actor's cumulative epsilon after this entry, as recorded by the writer;
- ``prev_hash``, ``hash`` (SHA-256 of the canonical entry without ``hash`` and ``signature``),
  ``key_id`` and ``signature`` (Ed25519 over the hash).

Verification re-serialises each parsed line and requires it to equal the bytes on disk, so any
changed byte is caught: as invalid JSON, as a non-canonical line, or as a hash or signature
mismatch. Deleting or reordering lines breaks the chain; a signed head file (``ledger.head.json``:
the entry count, which only grows and so numbers the heads, the last hash, the key id and the
run id of a run ledger's ``run_start`` entry) catches a truncated tail. Public keys are written
next to the ledger so anyone can verify it.

A signed head proves a ledger complete as of that head, not that it is the latest: an earlier
ledger with its earlier head verifies too. What catches such a rollback are witnesses of the
heads kept elsewhere (a writer's ``witness`` callback; see :mod:`common.witness`).
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import attr
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedpriv.common.errors import FedprivError
from fedpriv.common import key_providers
from fedpriv.common.keyfiles import KEY_ERRORS, PassphraseError, parse_private_key, passphrase, private_pem
from fedpriv.common.fileio import create_private, json_safe, open_private, private_dir, write_atomic
from fedpriv.common.lazy import lazy_import
from fedpriv.common.ledger_schema import LEDGER_ACTOR, Kind

dp_accounting = lazy_import("dp_accounting")  # scipy: loaded when first used (see common.lazy)

GENESIS = "0" * 64
LEDGER = "ledger.jsonl"
HEAD = "ledger.head.json"
PUBLIC_KEY = "ledger.pub"
TORN = "ledger.torn"  # what crash recovery cut off the end of a ledger (see LedgerWriter);
# the entry that records it is of kind Kind.LEDGER_RECOVERY (common.ledger_schema)


# ---- DpEvent (de)serialisation ----------------------------------------------------------------
def event_to_json(event: dp_accounting.DpEvent) -> dict[str, Any]:
    """A dp-accounting event as plain JSON: ``{"type": "PoissonSampledDpEvent", ...fields}``."""
    out: dict[str, Any] = {"type": type(event).__name__}
    for f in attr.fields(type(event)):
        out[f.name] = _value_to_json(getattr(event, f.name))
    return out


def _value_to_json(value: Any) -> Any:
    if isinstance(value, dp_accounting.DpEvent):
        return event_to_json(value)
    if isinstance(value, (list, tuple)):
        return [_value_to_json(v) for v in value]
    return value


def event_from_json(raw: Any) -> dp_accounting.DpEvent:
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise ValueError("not a serialised DpEvent")
    cls = getattr(dp_accounting, raw["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, dp_accounting.DpEvent)):
        raise ValueError(f"unknown DpEvent type {raw['type']!r}")
    kwargs = {}
    for f in attr.fields(cls):
        value = raw.get(f.name)
        if isinstance(value, dict) and "type" in value:
            value = event_from_json(value)
        elif isinstance(value, list):
            value = [event_from_json(v) if isinstance(v, dict) else v for v in value]
        kwargs[f.name] = value
    return cls(**kwargs)


# ---- keys --------------------------------------------------------------------------------------
def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key (PEM), or create one with 0600 permissions (passphrase-protected
    when a key passphrase is configured); a PKCS#11 URI in
    place of the path names a key in a token, which signs there (common/key_providers.py)."""
    if key_providers.is_pkcs11(path):
        return key_providers.Pkcs11SigningKey(str(path))  # type: ignore[return-value]
    if path.exists():
        try:
            key = parse_private_key(path.read_bytes())
        except PassphraseError as exc:
            raise FedprivError(f"signing key {path}: {exc}") from None
        except KEY_ERRORS as exc:
            raise FedprivError(f"signing key {path} is not a readable PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise FedprivError(f"signing key {path} is not an Ed25519 key")
        return key
    key = Ed25519PrivateKey.generate()
    # passphrase-protected when a key passphrase is configured (common/keyfiles.py)
    create_private(path, private_pem(key, passphrase()))
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise FedprivError(f"public key not found: {path}") from None
    except ValueError as exc:
        raise FedprivError(f"public key {path} is not a readable PEM key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise FedprivError(f"public key {path} is not an Ed25519 key")
    return key


# ---- entries -----------------------------------------------------------------------------------
def canonical(obj: Any) -> bytes:
    return json.dumps(json_safe(obj), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k not in ("hash", "signature")}
    return hashlib.sha256(canonical(body)).hexdigest()


class LedgerWriter:
    """Appends signed entries to ``<directory>/ledger.jsonl``; continues an existing ledger."""

    def __init__(self, directory: Path, signing_key: Ed25519PrivateKey) -> None:
        self.directory = directory
        self.path = directory / LEDGER
        self.key = signing_key
        self.key_id = key_id(signing_key.public_key())
        private_dir(directory)
        pub = directory / PUBLIC_KEY
        pem = public_pem(signing_key.public_key())
        if pub.exists() and pub.read_bytes() != pem:
            raise FedprivError(f"{pub} holds another key than the one signing this ledger")
        if not pub.exists():
            write_atomic(pub, pem)
        self.seq, self.prev_hash = 0, GENESIS
        self.run_id: str | None = None  # a run ledger's id (its run_start entry), bound into the head
        # Called with every signed head after it is written (witnesses outside the directory).
        self.witness: Callable[[dict[str, Any]], None] | None = None
        self.existing: list[dict[str, Any]] = []  # verified entries found when opened
        if self.path.exists():
            report = verify_ledger(directory, signing_key.public_key(), crash_tail=True)
            if not report.ok:
                raise FedprivError(f"refusing to extend ledger {self.path}: {report.failures[0]}")
            self.existing = report.entries
            self.seq, self.prev_hash = len(report.entries), report.head_hash
            self.run_id = ledger_run_id(report.entries)
            if report.crash_notes:
                self._recover(report)
            elif report.unterminated:
                with open_private(self.path, "ab") as handle:  # a complete last entry cut before its newline
                    handle.write(b"\n")

    def _recover(self, report: VerifyReport) -> None:
        """Finish what a killed writer left (see :func:`verify_ledger`'s ``crash_tail``), and
        say so in the ledger: the torn bytes are kept beside it in ``ledger.torn``."""
        if report.torn_tail is not None:
            with open_private(self.directory / TORN, "ab") as handle:
                handle.write(report.torn_tail + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
            size = self.path.stat().st_size - len(report.torn_tail)
            with open_private(self.path, "r+b") as handle:
                handle.truncate(size)
                handle.flush()
                os.fsync(handle.fileno())
        self.append(actor=LEDGER_ACTOR, kind=Kind.LEDGER_RECOVERY, note="; ".join(report.crash_notes))

    def append(self, *, actor: str, kind: Kind | str, round: int | None = None,
               event: dp_accounting.DpEvent | None = None, parameters: dict[str, Any] | None = None,
               sampling: str | None = None, epsilon: dict[str, Any] | None = None,
               note: str | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "seq": self.seq,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
            "round": round,
            "actor": str(actor),  # plain strings on disk (common.ledger_schema's enums are str)
            "kind": str(kind),
            "event": event_to_json(event) if event is not None else None,
            "parameters": parameters or {},
            "sampling": sampling,
            "epsilon": epsilon or {},
            "note": note,
            "prev_hash": self.prev_hash,
            "key_id": self.key_id,
        }
        entry = json_safe(entry)
        entry["hash"] = entry_hash(entry)
        entry["signature"] = base64.b64encode(self.key.sign(bytes.fromhex(entry["hash"]))).decode()
        with open_private(self.path, "ab") as handle:
            handle.write(canonical(entry) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        if entry["seq"] == 0:
            self.run_id = ledger_run_id([entry])
        self.seq += 1
        self.prev_hash = entry["hash"]
        self._write_head()
        return entry

    def head(self) -> dict[str, Any]:
        """The signed head of the ledger as it stands."""
        head = {"entries": self.seq, "head_hash": self.prev_hash, "key_id": self.key_id, "run_id": self.run_id}
        digest = hashlib.sha256(canonical(head)).digest()
        head["signature"] = base64.b64encode(self.key.sign(digest)).decode()
        return head

    def _write_head(self) -> None:
        head = self.head()
        write_atomic(self.directory / HEAD, canonical(head) + b"\n")
        if self.witness is not None:
            self.witness(head)


def ledger_run_id(entries: list[dict[str, Any]]) -> str | None:
    """The run id a run ledger's first entry (``run_start``) names; None for other ledgers."""
    if not entries or entries[0].get("kind") != Kind.RUN_START:
        return None
    run_id = (entries[0].get("parameters") or {}).get("run_id")
    return run_id if isinstance(run_id, str) else None


def verify_head_signature(head: dict[str, Any], key: Ed25519PublicKey) -> bool:
    """Whether ``head`` (with its ``signature``) was signed by ``key``."""
    body = {k: v for k, v in head.items() if k != "signature"}
    try:
        key.verify(base64.b64decode(head["signature"], validate=True), hashlib.sha256(canonical(body)).digest())
    except (InvalidSignature, KeyError, ValueError, TypeError):
        return False
    return True


# ---- verification ------------------------------------------------------------------------------
@dataclass
class VerifyReport:
    entries: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    head_hash: str = GENESIS
    # What a writer killed mid-append left behind, found with ``crash_tail=True`` (see there).
    torn_tail: bytes | None = None  # an unterminated, unreadable last line
    head_behind: bool = False  # the last entry is complete but the head was not yet re-signed
    head: dict[str, Any] | None = None  # the signed head as read (signature removed)
    unterminated: bool = False  # the last line (an entry, or torn) lacks its newline

    @property
    def crash_notes(self) -> list[str]:
        notes = []
        if self.torn_tail is not None:
            notes.append(f"the ledger ended in a torn, unterminated line of {len(self.torn_tail)} bytes (a "
                         "write cut short by a crash); it holds no complete entry and was left out")
        if self.head_behind:
            notes.append(f"entry {len(self.entries) - 1} was written, signed and chained, but the writer "
                         "stopped before re-signing the ledger head")
        return notes

    @property
    def ok(self) -> bool:
        return not self.failures


def _lines(path: Path) -> tuple[list[bytes], bool]:
    """The ledger's lines, and whether the last one is terminated by a newline."""
    lines = path.read_bytes().split(b"\n")
    terminated = bool(lines) and lines[-1] == b""
    if terminated:
        lines.pop()
    return lines, terminated


def verify_ledger(directory: Path, public_key: Ed25519PublicKey | None = None,
                  crash_tail: bool = False) -> VerifyReport:
    """Check every line, the hash chain, every signature and the signed head.

    ``public_key``: the key entries must be signed with; default, ``ledger.pub`` beside it.

    ``crash_tail``: accept the two states a writer killed in :meth:`LedgerWriter.append` can
    leave (and say so in :attr:`VerifyReport.crash_notes`): an unterminated last line that is not
    an entry (the write was cut short; only a power loss can do that, a killed process's
    single write is whole), and a head one entry behind a last entry that is itself complete,
    chained and signed (killed between the append and the head). Nothing else is accepted: no
    entry can be removed, and only an entry signed with the ledger key can be beyond the head.
    """
    report = VerifyReport()
    path = directory / LEDGER
    if not path.is_file():
        report.failures.append(f"no ledger at {path}")
        return report
    key = public_key or load_public_key(directory / PUBLIC_KEY)
    expected_key_id = key_id(key)
    prev = GENESIS
    lines, terminated = _lines(path)
    report.unterminated = bool(lines) and not terminated
    for number, raw in enumerate(lines, start=1):
        where = f"ledger line {number}"
        try:
            entry = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if crash_tail and number == len(lines) and not terminated:
                report.torn_tail = raw
                break
            report.failures.append(f"{where} is not valid JSON (altered or corrupt)")
            return report
        if not isinstance(entry, dict):
            report.failures.append(f"{where} is not a ledger entry")
            return report
        try:
            is_canonical = canonical(entry) == raw
        except (TypeError, ValueError):
            is_canonical = False
        if not is_canonical:
            report.failures.append(f"{where} was altered (its bytes are not the signed encoding)")
            return report
        if entry.get("seq") != len(report.entries):
            report.failures.append(f"{where}: expected entry {len(report.entries)}, found {entry.get('seq')} "
                                   "(lines deleted, inserted or reordered)")
            return report
        if entry.get("prev_hash") != prev:
            report.failures.append(f"{where}: hash chain broken (lines deleted, inserted or reordered)")
            return report
        if entry.get("hash") != entry_hash(entry):
            report.failures.append(f"{where}: content does not match its hash (altered)")
            return report
        if entry.get("key_id") != expected_key_id:
            report.failures.append(f"{where}: signed by key {entry.get('key_id')}, not the ledger key "
                                   f"{expected_key_id}")
            return report
        try:
            key.verify(base64.b64decode(entry.get("signature", ""), validate=True), bytes.fromhex(entry["hash"]))
        except (InvalidSignature, ValueError, TypeError):
            report.failures.append(f"{where}: invalid signature")
            return report
        report.entries.append(entry)
        prev = entry["hash"]
    report.head_hash = prev
    _verify_head(directory, key, report, crash_tail)
    return report


def _verify_head(directory: Path, key: Ed25519PublicKey, report: VerifyReport, crash_tail: bool) -> None:
    path = directory / HEAD
    entries = report.entries
    before_last = entries[-2]["hash"] if len(entries) >= 2 else GENESIS
    try:
        head = json.loads(path.read_text())
        signature = base64.b64decode(head.pop("signature"), validate=True)
        key.verify(signature, hashlib.sha256(canonical(head)).digest())
    except FileNotFoundError:
        if crash_tail and len(entries) == 1:  # killed before the first head was written
            report.head_behind = True
            return
        report.failures.append(f"no signed ledger head ({HEAD})")
        return
    except (ValueError, KeyError, TypeError, AttributeError, InvalidSignature):
        report.failures.append(f"{HEAD} is corrupt or not signed by the ledger key")
        return
    report.head = head
    # Heads written before fedpriv bound the run id into them have no "run_id" (still accepted).
    if "run_id" in head and head["run_id"] != ledger_run_id(entries):
        report.failures.append(f"{HEAD} is signed for run {head['run_id']}, but the ledger is of run "
                               f"{ledger_run_id(entries)}")
        return
    if crash_tail and entries and head.get("entries") == len(entries) - 1 and head.get("head_hash") == before_last:
        report.head_behind = True
        return
    if head.get("entries") != len(report.entries) or head.get("head_hash") != report.head_hash:
        report.failures.append(
            f"ledger has {len(report.entries)} entries but its signed head records "
            f"{head.get('entries')} (lines deleted or appended without signing)"
        )
