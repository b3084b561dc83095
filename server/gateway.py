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
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

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


def _response(status: str, text: str) -> bytes:
    body = (text + "\n").encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


@dataclass
class Gateway:
    """Listens on ``host:port`` with TLS; forwards allowed requests to the SuperLink."""

    host: str
    port: int
    certfile: Path
    keyfile: Path
    upstream_host: str
    upstream_port: int
    ca: Path

    def __post_init__(self) -> None:
        self.server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.server_context.load_cert_chain(str(self.certfile), str(self.keyfile))
        self.client_context = ssl.create_default_context(cafile=str(self.ca))
        self.client_context.check_hostname = False  # loopback; the chain is still verified
        self.refused = 0
        self.forwarded = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # ---- lifecycle (a daemon thread with its own event loop) -------------------------------
    def start(self) -> None:
        threading.Thread(target=self._run, name="fedpriv-gateway", daemon=True).start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            server = self._loop.run_until_complete(asyncio.start_server(
                self._handle, self.host, self.port, ssl=self.server_context, ssl_handshake_timeout=20,
                limit=MAX_HEAD))
        except OSError as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    # ---- one connection: one request ------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ssl.SSLError,
                asyncio.TimeoutError, OSError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=60)
        lines = head[:-4].split(b"\r\n")
        try:
            method, path, version = lines[0].decode("latin-1").split(" ")
        except ValueError:
            writer.write(_response("400 Bad Request", "malformed request"))
            return
        if not allowed(method, path):
            self.refused += 1
            writer.write(_response("403 Forbidden", "fedpriv gateway: only the Fleet API is served here"))
            await writer.drain()
            return
        headers, length = [], 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            if key == b"transfer-encoding":
                writer.write(_response("411 Length Required", "chunked requests are not forwarded"))
                return
            if key == b"content-length":
                length = int(value.strip())
            if key not in HOP_BY_HOP:
                headers.append(line)
        up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(
            self.upstream_host, self.upstream_port, ssl=self.client_context), timeout=30)
        try:
            up_writer.write(f"{method} {path} {version}\r\n".encode("latin-1")
                            + b"".join(h + b"\r\n" for h in headers) + b"connection: close\r\n\r\n")
            remaining = length
            while remaining > 0:
                chunk = await reader.read(min(CHUNK, remaining))
                if not chunk:
                    return
                up_writer.write(chunk)
                remaining -= len(chunk)
                await up_writer.drain()
            await up_writer.drain()
            self.forwarded += 1
            while True:
                chunk = await up_reader.read(CHUNK)
                if not chunk:
                    break
                writer.write(chunk)
                await writer.drain()
        finally:
            up_writer.close()
