"""``fedpriv operator connect``: carry an operator's certificate to the operators' port.

Flower 1.42's ``flwr`` CLI verifies the SuperLink against root certificates but cannot present a
client certificate, so it cannot pass the operators' port's mutual TLS by itself. This command
listens on loopback only, and forwards each request to the operators' port over TLS with the
operator's certificate and key (:class:`server.gateway.Forwarder`); point a ``flwr`` connection
at it (``address = "127.0.0.1:PORT"``, ``insecure = true``: the hop is local to this machine).
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Any

DEFAULT_LOCAL_PORT = 9193


def add_parser(sub: Any) -> None:
    operator = sub.add_parser("operator", help="operator tools: reach the operators' port with flwr",
                              description="Operator tools (connect).")
    operator_sub = operator.add_subparsers(dest="operator_command", metavar="COMMAND", required=True)
    connect = operator_sub.add_parser(
        "connect", help="forward a loopback port to the operators' port with your certificate",
        description=(
            "Listen on 127.0.0.1:--port and forward every request to the operators' port "
            "(--superlink HOST:PORT, verified against --root-cert by name) over TLS with your "
            "operator certificate (fedpriv keys --operator). Then use flwr with a connection whose "
            "address is 127.0.0.1:PORT and insecure = true (the hop stays on this machine). Runs "
            "until stopped (Ctrl-C or SIGTERM)."),
    )
    connect.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the operators' port")
    connect.add_argument("--root-cert", required=True, type=Path, metavar="CA", help="the federation's ca.crt")
    connect.add_argument("--cert", required=True, type=Path, metavar="FILE", help="your operators/NAME.crt")
    connect.add_argument("--key", required=True, type=Path, metavar="FILE", help="your operators/NAME.key")
    connect.add_argument("--port", type=int, default=DEFAULT_LOCAL_PORT,
                         help=f"the local port (default {DEFAULT_LOCAL_PORT}; 0: any free port)")
    connect.set_defaults(func=cmd_connect)


def start_forwarder(superlink: str, root_cert: Path, cert: Path, key: Path, port: int = 0) -> Any:
    """A started :class:`server.gateway.Forwarder` (one-line errors for bad input)."""
    import ssl

    from fedpriv.common.errors import FedprivError
    from fedpriv.common.tls import load_certificate, parse_address
    from fedpriv.server.gateway import Forwarder

    address = parse_address(superlink, "--superlink")
    load_certificate(root_cert, "root certificate")
    load_certificate(cert, "operator certificate")
    try:
        forwarder = Forwarder(port, address.host, address.port, root_cert, (cert, key))
    except (ssl.SSLError, OSError) as exc:
        raise FedprivError(f"cannot use the operator certificate {cert} and key {key} ({exc})") from None
    try:
        forwarder.start()
    except OSError as exc:
        raise FedprivError(f"cannot listen on 127.0.0.1:{port} ({exc.strerror})") from None
    return forwarder


def cmd_connect(args: argparse.Namespace) -> int:
    forwarder = start_forwarder(args.superlink, args.root_cert, args.cert, args.key, args.port)
    print(f"fedpriv: forwarding 127.0.0.1:{forwarder.port} to the operators' port {args.superlink} as "
          f"{args.cert.name}")
    print("fedpriv: in $FLWR_HOME/config.toml:\n"
          f'  [superlink.fedpriv]\n  address = "127.0.0.1:{forwarder.port}"\n  insecure = true')
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    forwarder.stop()
    return 0
