"""Operators: who may act on a federation's SuperLink, by role, with certificates from its CA.

An operator holds a TLS client certificate issued by the federation CA (``fedpriv keys
--operator NAME --role ROLE``): its subject names the operator (common name) and its role
(organizational unit ``fedpriv-role:ROLE``). The operators' gateway (:mod:`server.operators`)
requires one on every connection and allows each Control API call only to the roles in
:data:`PERMISSIONS`.

Roles:

- ``admin``: register and unregister nodes, list them, stop runs, follow runs;
- ``researcher``: submit runs, follow and stop its own runs;
- ``auditor``: list runs and nodes (and read ledgers, audits and reports on the server machine);
  no run submission, no logs, no artifacts (no model or data download).
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpriv.common.errors import FedprivError
from fedpriv.common.keyfiles import PassphraseError, parse_private_key, private_pem
from fedpriv.common.ledger import LEDGER, verify_ledger
from fedpriv.common.ledger_schema import Kind, Role, parse_actor

ROLES = ("admin", "researcher", "auditor")
ROLE_PREFIX = "fedpriv-role:"
OPERATORS_DIR = "operators"
OPERATOR_LOG = "operator-log"  # in the server's state directory
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# Control API calls (POST /v1/control/<call>) and the roles allowed to make them. "own": a
# researcher may make the call only for runs it submitted (the gateway checks the run id).
PERMISSIONS: dict[str, dict[str, str]] = {
    "start-run": {"researcher": "any"},
    "list-runs": {"admin": "any", "researcher": "any", "auditor": "any"},
    "stream-logs": {"admin": "any", "researcher": "own"},
    "stream-run-events": {"admin": "any", "researcher": "own"},
    "stop-run": {"admin": "any", "researcher": "own"},
    "register-node": {"admin": "any"},
    "unregister-node": {"admin": "any"},
    "list-nodes": {"admin": "any", "auditor": "any"},
    "get-login-details": {"admin": "any", "researcher": "any", "auditor": "any"},
}


@dataclass(frozen=True)
class Operator:
    name: str
    role: str
    serial: int


def operator_of(certificate: x509.Certificate) -> Operator:
    """The operator a (CA-verified) client certificate names; FedprivError if it names none."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    units = [str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    roles = [u[len(ROLE_PREFIX):] for u in units if u.startswith(ROLE_PREFIX)]
    if len(names) != 1 or len(roles) != 1 or roles[0] not in ROLES:
        raise FedprivError("the client certificate names no fedpriv operator and role")
    return Operator(str(names[0].value), roles[0], certificate.serial_number)


def issue_operator(ca_cert_pem: bytes, ca_key_pem: bytes, name: str, role: str,
                   days: int = 365, secret: bytes | None = None) -> tuple[bytes, bytes]:
    """A new operator key (PEM, PKCS#8; protected with ``secret`` when given) and its client
    certificate (PEM), signed by the CA."""
    if not NAME_PATTERN.fullmatch(name):
        raise FedprivError(f"operator name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    if role not in ROLES:
        raise FedprivError(f"unknown role {role!r} (choose from {', '.join(ROLES)})")
    if days < 1:
        raise FedprivError("--days must be at least 1")
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        ca_key = parse_private_key(ca_key_pem)
    except PassphraseError as exc:
        raise FedprivError(f"the CA key: {exc}") from None
    except ValueError as exc:
        raise FedprivError(f"cannot read the CA certificate or key ({exc})") from None
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ROLE_PREFIX + role)])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return private_pem(key, secret), cert.public_bytes(serialization.Encoding.PEM)


def submitted_runs(log_dir: Path, public_key: Any = None) -> dict[int, dict[str, str]]:
    """Flower run id -> the operator (name, role) who submitted it, from a verified operator log
    (``STATE/operator-log``); FedprivError if the log does not verify."""
    runs: dict[int, dict[str, str]] = {}
    if not (log_dir / LEDGER).exists():
        return runs
    report = verify_ledger(log_dir, public_key)
    if report.failures:
        raise FedprivError(f"the operator log {log_dir} does not verify: {report.failures[0]}")
    for entry in report.entries:
        parameters = entry.get("parameters") or {}
        run = parameters.get("run_id")
        actor = parse_actor(entry.get("actor"))
        if (entry.get("kind") == Kind.OPERATOR_ACTION and parameters.get("action") == "start-run"
                and parameters.get("allowed") and run):
            runs[int(run)] = {"operator": actor.id if actor.role is Role.OPERATOR and actor.id is not None else actor.raw,
                              "role": str(parameters.get("role", ""))}
    return runs
