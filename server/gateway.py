"""The public face of the SuperLink: a TLS gateway that serves the Fleet API and nothing else.

Flower 1.42's open-source SuperLink serves its Fleet API (what SuperNodes use), its Control API
(register nodes, submit and stop runs, read logs) and its Runtime API (what the ServerApp uses)
on one HTTPS port, and its Control API has no operator login (that needs Flower's enterprise
OIDC plugin). Exposed as is, anyone who reaches the port could register a node key of their
own, or submit runs: node authentication would protect nothing.

So ``fedpriv server start`` binds the SuperLink to loopback (the admin port, for operators on
the server machine) and puts this gateway on the public port. It terminates TLS with the
SuperLink's certificate, lets through ``POST /v1/fleet/...`` and the health check only, answers
everything else with 403, and forwards each allowed request to the SuperLink over TLS on
loopback, one request per connection (``Connection: close``), so no request framing beyond
``Content-Length`` has to be understood. Node authentication headers pass through unchanged:
the SuperLink still verifies every node.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpriv.common.tls import load_cert_chain

log = logging.getLogger("fedpriv")

ALLOWED = (("POST", "/v1/fleet/"), ("GET", "/health"), ("HEAD", "/health"))
MAX_HEAD = 64 * 1024
CHUNK = 1 << 16
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"}


def allowed(method: str, path: str) -> bool:
    """Only the Fleet API and the health check cross the gateway."""
    path = path.split("?", 1)[0]
    if ".." in path or "//" in path or "%" in path:
        return False
    return any(method == m and (path == p or (p.endswith("/") and path.startswith(p))) for m, p in ALLOWED)


_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


class BadRequest(ValueError):
    """A request head this gateway will not forward (answered with 400)."""


def parse_head(head: bytes) -> tuple[str, str, str, list[tuple[bytes, bytes]], int]:
    """Method, target, version, headers and Content-Length of one request head (ending CRLF CRLF),
    parsed strictly: CRLF line ends only (no bare LF or CR), no folded or empty-named header lines,
    header names that are tokens, values without control characters, one Content-Length of digits
    and no Transfer-Encoding. The forwarded head is rebuilt from the parsed values, so another
    HTTP parser upstream cannot read it differently."""
    if not head.endswith(b"\r\n\r\n"):
        raise BadRequest("the request head does not end with CRLF CRLF")
    lines = head[:-4].split(b"\r\n")
    if any(b"\n" in line or b"\r" in line for line in lines):
        raise BadRequest("a bare LF or CR in the request head")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1] or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest("malformed request line")
    method, target, version = (p.decode("latin-1") for p in parts)
    if not _TOKEN.fullmatch(parts[0]) or not target.startswith("/"):
        raise BadRequest("malformed request line")
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise BadRequest("folded header lines are not accepted")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise BadRequest("a malformed header name")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.fullmatch(value):
            raise BadRequest("a control character in a header value")
        key = name.lower()
        if key == b"transfer-encoding":
            raise BadRequest("chunked requests are not forwarded")
        if key == b"content-length":
            if length is not None or not value.isdigit() or len(value) > 18:
                raise BadRequest("a malformed or repeated Content-Length")
            length = int(value)
        headers.append((key, value))
    return method, target, version, headers, length or 0


def _response(status: str, text: str) -> bytes:
    body = (text + "\n").encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


@dataclass
class Gateway:
    """Listens on ``host:port`` with TLS (plain when ``certfile`` is None: a loopback forwarder);
    forwards allowed requests to ``upstream`` over TLS verified against ``ca``, presenting
    ``client_cert`` (certificate, key) there if given."""

    host: str
    port: int
    certfile: Path | None
    keyfile: Path | None
    upstream_host: str
    upstream_port: int
    ca: Path
    client_cert: tuple[Path, Path] | None = None
    buffer_body: bool = False  # read a request's whole body before authorize() sees it
    handshake_in_handler: bool = False  # TLS after accepting, so a refused handshake is seen
    max_body: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        self.server_context = self.make_server_context() if self.certfile is not None else None
        self.client_context = ssl.create_default_context(cafile=str(self.ca))
        self.client_context.check_hostname = False  # loopback; the chain is still verified
        if self.client_cert is not None:
            load_cert_chain(self.client_context, self.client_cert[0], self.client_cert[1])
        self.refused = 0
        self.forwarded = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def make_server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        load_cert_chain(context, self.certfile, self.keyfile)
        return context

    # ---- lifecycle (a daemon thread with its own event loop) -------------------------------
    def start(self) -> None:
        threading.Thread(target=self._run, name="fedpriv-gateway", daemon=True).start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            tls = None if self.handshake_in_handler else self.server_context
            server = self._loop.run_until_complete(asyncio.start_server(
                self._handle, self.host, self.port, ssl=tls, ssl_handshake_timeout=20 if tls else None,
                limit=MAX_HEAD))
            if self.port == 0:
                self.port = server.sockets[0].getsockname()[1]
        except OSError as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                async def drain() -> None:
                    await asyncio.gather(*pending, return_exceptions=True)

                self._loop.run_until_complete(drain())
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    # ---- one connection: one request ------------------------------------------------------
    def handshake_refused(self, reason: str) -> None:
        """A TLS handshake failed (only seen with ``handshake_in_handler``): a hook."""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.handshake_in_handler and self.server_context is not None:
                try:
                    await writer.start_tls(self.server_context, ssl_handshake_timeout=20)
                except (ssl.SSLError, ConnectionError, asyncio.TimeoutError) as exc:
                    self.refused += 1
                    self.handshake_refused(getattr(exc, "reason", None) or type(exc).__name__)
                    return
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError,
                asyncio.TimeoutError, OSError):
            pass
        finally:
            writer.close()

    def authorize(self, method: str, path: str, peer: Any, body: bytes | None) -> str | None:
        """Why this request is refused (None: forward it). ``peer`` is the TLS connection's
        ``ssl_object``; ``body`` the request body with ``buffer_body`` (else None). The nodes'
        gateway serves the Fleet API and the health check only."""
        if allowed(method, path):
            return None
        return "fedpriv gateway: only the Fleet API is served here"

    def wants_response(self, method: str, path: str) -> bool:
        """Whether :meth:`forwarded_response` should see this request's whole response (a hook)."""
        return False

    def forwarded_response(self, method: str, path: str, peer: Any, response: bytes) -> None:
        """Called with the upstream's whole response (at most 1 MiB) to a forwarded request for
        which :meth:`wants_response` said so: a hook for the operators' gateway."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=60)
        try:
            method, path, version, parsed, length = parse_head(head)
        except BadRequest as exc:
            writer.write(_response("400 Bad Request", f"fedpriv gateway: {exc}"))
            await writer.drain()
            return
        peer = writer.get_extra_info("ssl_object")
        body: bytes | None = None
        if self.buffer_body:
            if length > self.max_body:
                writer.write(_response("413 Content Too Large", "fedpriv gateway: request body too large"))
                await writer.drain()
                return
            body = await asyncio.wait_for(reader.readexactly(length), timeout=300)
        refusal = self.authorize(method, path, peer, body)
        if refusal is not None:
            self.refused += 1
            writer.write(_response("403 Forbidden", refusal))
            await writer.drain()
            return
        headers = [name + b": " + value for name, value in parsed if name not in HOP_BY_HOP]
        up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(
            self.upstream_host, self.upstream_port, ssl=self.client_context), timeout=30)
        try:
            up_writer.write(f"{method} {path} {version}\r\n".encode("latin-1")
                            + b"".join(h + b"\r\n" for h in headers) + b"connection: close\r\n\r\n")
            remaining = 0 if body is not None else length
            if body is not None:
                up_writer.write(body)
            while remaining > 0:
                chunk = await reader.read(min(CHUNK, remaining))
                if not chunk:
                    return
                up_writer.write(chunk)
                remaining -= len(chunk)
                await up_writer.drain()
            await up_writer.drain()
            self.forwarded += 1
            if self.wants_response(method, path):  # small replies (a StartRun's run id), whole
                response = await asyncio.wait_for(up_reader.read(1 << 20), timeout=300)
                while len(response) < 1 << 20:
                    more = await asyncio.wait_for(up_reader.read(1 << 20), timeout=300)
                    if not more:
                        break
                    response += more
                self.forwarded_response(method, path, peer, response)
                writer.write(response)
                await writer.drain()
            while True:
                chunk = await up_reader.read(CHUNK)
                if not chunk:
                    break
                writer.write(chunk)
                await writer.drain()
        finally:
            up_writer.close()


class Forwarder(Gateway):
    """A plain listener on loopback that forwards every request to a TLS server verified by name
    against ``ca``, presenting ``client_cert``: how Flower's ``flwr`` CLI, which cannot present a
    client certificate, reaches the operators' port (``fedpriv operator connect``). The operators'
    gateway decides what is allowed; this only carries the operator's certificate."""

    def __init__(self, port: int, upstream_host: str, upstream_port: int, ca: Path,
                 client_cert: tuple[Path, Path], host: str = "127.0.0.1") -> None:
        super().__init__(host, port, None, None, upstream_host, upstream_port, ca, client_cert=client_cert)
        self.client_context.check_hostname = True  # a remote operators' port: verify its name too

    def authorize(self, method: str, path: str, peer: Any, body: bytes | None) -> str | None:
        return None
