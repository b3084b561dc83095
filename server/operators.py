"""The operators' port: mutual TLS, roles, revocation and a signed log of every operator action.

Flower 1.42's open-source Control API authenticates nobody. ``fedpriv server start`` keeps the
SuperLink itself on loopback and puts :class:`OperatorGateway` in front of it for operators: a
connection must present a client certificate issued by the federation CA
(:func:`common.operators.issue_operator`), not revoked, whose role may make the Control API call
asked for (:data:`common.operators.PERMISSIONS`); a researcher may follow or stop only runs it
submitted. Everything else is answered 403 with a one-line reason. Every attempt -- who, what,
when, allowed or refused and why, TLS handshakes refused for want of a valid certificate included
-- is appended to the operator log, a hash-chained ledger signed with the server's ledger key
(:class:`common.ledger.LedgerWriter`, ``STATE/operator-log``); a StartRun records the Flower run id
the SuperLink answered, so the log says who submitted each run.

Revocation takes effect without a restart: the gateway reads ``STATE/revoked.json`` on every
request (:func:`revoke_operator` writes it).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from cryptography import x509

from fedpriv.common.errors import FedprivError
from fedpriv.common.ledger import LedgerWriter
from fedpriv.common.ledger_schema import Kind, operator_actor
from fedpriv.common.operators import OPERATOR_LOG, PERMISSIONS, Operator, operator_of, submitted_runs
from fedpriv.common.fileio import write_atomic
from fedpriv.server.gateway import Gateway

log = logging.getLogger("fedpriv")

REVOKED = "revoked.json"
CONTROL_PREFIX = "/v1/control/"


def revoked_serials(state: Path) -> set[int]:
    """The serial numbers of revoked operator certificates (``STATE/revoked.json``)."""
    path = state / REVOKED
    if not path.exists():
        return set()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {int(s) for s in raw.get("operators", [])}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        # A revocation list that cannot be read must not let revoked operators back in.
        raise FedprivError(f"the revocation list {path} cannot be read ({exc})") from None


def revoke_operator(state: Path, certificate: Path) -> Operator:
    """Add the operator certificate's serial to the revocation list; return whom it named."""
    try:
        cert = x509.load_pem_x509_certificate(Path(certificate).read_bytes())
    except (OSError, ValueError) as exc:
        raise FedprivError(f"cannot read the operator certificate {certificate} ({exc})") from None
    who = operator_of(cert)
    serials = revoked_serials(state) | {who.serial}
    write_atomic(state / REVOKED, json.dumps({"operators": sorted(serials)}, indent=1).encode())
    return who


def _run_id(body: bytes | None) -> int | None:
    """The run id of a StopRun / StreamLogs / StreamRunEvents request (all carry it as field 1)."""
    from flwr.proto.control_pb2 import StopRunRequest

    if body is None:
        return None
    request = StopRunRequest()
    try:
        request.ParseFromString(body)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError: not a request with a run id
        return None
    return int(request.run_id)


def _dechunk(body: bytes) -> bytes:
    """The payload of an HTTP/1.1 chunked body."""
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2:]
    return out


def _started_run(response: bytes) -> int | None:
    """The run id in a whole StartRun HTTP response."""
    from flwr.proto.control_pb2 import StartRunResponse

    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if lines[0].split(b" ")[1:2] != [b"200"]:
        return None
    if any(line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower() for line in lines[1:]):
        try:
            body = _dechunk(body)
        except ValueError:
            return None
    response = StartRunResponse()
    try:
        response.ParseFromString(body)
    except Exception:  # noqa: BLE001 - not the whole body, or not a StartRunResponse
        return None
    return int(response.run_id) if response.HasField("run_id") else None


class OperatorLog:
    """The signed, hash-chained log of operator actions (one writer, thread-safe)."""

    def __init__(self, state: Path, signing_key: Any) -> None:
        self.path = state / OPERATOR_LOG
        self._writer = LedgerWriter(self.path, signing_key)
        self._lock = threading.Lock()

    def record(self, operator: Operator | None, action: str, allowed: bool, note: str = "",
               **parameters: Any) -> None:
        actor = operator_actor(operator.name if operator else None)
        details = {"action": action, "allowed": allowed, **parameters}
        if operator is not None:
            details.update(role=operator.role, serial=str(operator.serial))
        with self._lock:
            self._writer.append(actor=actor, kind=Kind.OPERATOR_ACTION, parameters=details, note=note or None)

    def submitted_runs(self) -> dict[int, str]:
        """Flower run id -> the operator who submitted it."""
        return {run: who["operator"] for run, who in submitted_runs(self.path).items()}


class OperatorGateway(Gateway):
    """The operators' port (see the module doc)."""

    def __init__(self, host: str, port: int, certfile: Path, keyfile: Path, upstream_host: str,
                 upstream_port: int, ca: Path, state: Path, signing_key: Any) -> None:
        super().__init__(host, port, certfile, keyfile, upstream_host, upstream_port, ca,
                         buffer_body=True, handshake_in_handler=True)
        self.state = state
        self.log = OperatorLog(state, signing_key)
        self._runs = self.log.submitted_runs()  # run id -> submitting operator, from this log

    def make_server_context(self):  # type: ignore[no-untyped-def]
        import ssl

        context = super().make_server_context()
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(self.ca))
        return context

    def handshake_refused(self, reason: str) -> None:
        self.log.record(None, "connect", False, f"TLS handshake refused ({reason}): no valid operator certificate")

    def _operator(self, peer: Any) -> Operator:
        der = peer.getpeercert(binary_form=True) if peer is not None else None
        if not der:
            raise FedprivError("no client certificate")
        return operator_of(x509.load_der_x509_certificate(der))

    def authorize(self, method: str, path: str, peer: Any, body: bytes | None) -> str | None:
        action = path.split("?", 1)[0]
        action = action[len(CONTROL_PREFIX):] if action.startswith(CONTROL_PREFIX) else action
        try:
            who = self._operator(peer)
        except FedprivError as exc:
            self.log.record(None, action, False, str(exc))
            return f"fedpriv operators' port: {exc}"
        try:
            revoked = who.serial in revoked_serials(self.state)
        except FedprivError as exc:
            self.log.record(who, action, False, str(exc))
            return f"fedpriv operators' port: {exc}"
        if revoked:
            self.log.record(who, action, False, "certificate revoked")
            return f"fedpriv operators' port: the certificate of {who.name} is revoked"
        allowed_roles = PERMISSIONS.get(action) if method == "POST" and path.startswith(CONTROL_PREFIX) else None
        scope = (allowed_roles or {}).get(who.role)
        if scope is None:
            note = f"role {who.role} may not {method} {path}"
            self.log.record(who, action, False, note)
            return f"fedpriv operators' port: {note}"
        run = _run_id(body) if scope == "own" else None
        if scope == "own" and self._runs.get(run or -1) != who.name:
            note = f"{who.name} ({who.role}) may {action} only runs it submitted; run {run} is not one"
            self.log.record(who, action, False, note, run_id=str(run))
            return f"fedpriv operators' port: {note}"
        if action != "start-run":  # a StartRun is logged with its run id once the SuperLink answers
            self.log.record(who, action, True, **({"run_id": str(run)} if run else {}))
        return None

    def wants_response(self, method: str, path: str) -> bool:
        return path.split("?", 1)[0] == CONTROL_PREFIX + "start-run"

    def forwarded_response(self, method: str, path: str, peer: Any, response: bytes) -> None:
        if not self.wants_response(method, path):
            return
        who = self._operator(peer)
        run = _started_run(response)
        if run is not None:
            self._runs[run] = who.name
        self.log.record(who, "start-run", True, run_id=str(run) if run is not None else None)
