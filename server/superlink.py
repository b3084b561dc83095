"""``fedpriv server start`` and ``fedpriv server run``: Flower's SuperLink, safe by default.

``start`` checks the federation's key material (see ``fedpriv keys``), then runs
``flower-superlink`` with TLS, SuperNode authentication, a persistent database and runtime
dependency installation off, on an internal loopback port; once it answers over TLS, it
registers the node public keys, writes a connection (``fedpriv``) for its own ``flwr`` calls into
the state directory, and opens two gateways in front of it: the nodes' port (the Fleet API only,
:class:`server.gateway.Gateway`) and the operators' port (mutual TLS with operator certificates,
roles and a signed operator log, :class:`server.operators.OperatorGateway`), whose address it
writes to ``STATE/operators.json``. The ServerApps it
runs sign their ledgers with the federation's ledger key, seal checkpoints with its checkpoint
key and write run directories under ``STATE/runs``.

``run`` submits fedpriv's Flower app to a SuperLink's operators' port with a validated
configuration, through ``flwr run --stream`` and a loopback forwarder that presents the operator's
certificate (:class:`server.gateway.Forwarder`), and reports where the run directory is. It signs the app bundle with the
federation's app-signing key (``run.app_signature``, :mod:`common.appsign`): fedpriv nodes run
nothing else. The bundle is built once and unpacked into a scratch directory that ``flwr run``
then submits, so what was signed is exactly what is sent.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpriv.common import checkpoint, keyfiles, rundir, secret_env
from fedpriv.common.appsign import APP_KEY, SIGNATURE_SETTING, load_signing_key, sign_app, snapshot_app
from fedpriv.common.keys import ROSTER
from fedpriv.common.roster import ROSTER_ENV
from fedpriv.common.fileio import private_dir, write_atomic
from fedpriv.common.witness import WITNESS_DIR, WITNESS_ENV
from fedpriv.common.config import RunConfig, toml_value
from fedpriv.common.process import Child, flower_environment, flower_executable, terminate_as_exit
from fedpriv.common.tls import (
    Address, DeploymentError, check_issued_by, check_key_pair, check_node_public_key, check_tls,
    load_certificate, parse_address, read_file, subject_names,
)
from fedpriv.server.gateway import Forwarder, Gateway

CONNECTION = "fedpriv"
# The layout of the state directory (named in common.rundir).
DATABASE = rundir.STATE_DATABASE
RUNS = rundir.STATE_RUNS
FLWR_HOME = rundir.STATE_FLWR_HOME
KEYS_LINK = rundir.STATE_KEYS_LINK
OPERATORS_FILE = rundir.STATE_OPERATORS
READY_TIMEOUT = 60.0
RUN_WRITTEN = re.compile(r"fedpriv: run written to (\S+)")


@dataclass(frozen=True)
class SuperLinkPlan:
    argv: list[str]
    env: dict[str, str]
    state: Path
    ca: Path
    cert: Path
    key: Path
    admin: Address  # the operators' port: Control API calls by role, mutual TLS
    public: Address  # the gateway: the Fleet API only (nodes)
    node_keys: list[Path]
    roster: Path  # the signed node roster the ServerApp sends nodes ($FEDPRIV_ROSTER)
    internal: Address  # the SuperLink itself, on loopback: every API (this machine only)
    admin_host: str  # the interface the operators' port listens on
    pass_fds: tuple[int, ...] = ()  # a protected TLS key, decrypted in memory for the SuperLink


def plan_superlink(keys: Path, state: Path, host: str, port: int, register: list[Path] | None = None,
                   admin_host: str = "127.0.0.1", admin_port: int | None = None,
                   roster: Path | None = None, internal_port: int = 0) -> SuperLinkPlan:
    """Check everything ``start`` needs; nothing is started or written."""
    keys, state = keys.resolve(), state.resolve()
    if not keys.is_dir():
        raise DeploymentError(f"key directory {keys} does not exist (create it with fedpriv keys --out {keys})")
    ca_path, cert_path, key_path = keys / "ca.crt", keys / "superlink.crt", keys / "superlink.key"
    ca = load_certificate(ca_path, "CA certificate")
    cert = load_certificate(cert_path, "SuperLink certificate")
    check_key_pair(cert, key_path, "SuperLink key")
    check_issued_by(cert, ca, f"SuperLink certificate {cert_path}")
    ledger_key = keys / rundir.LEDGER_SIGNING_KEY
    read_file(ledger_key, "ledger-signing key")
    env = {
        "FLWR_HOME": str(state / FLWR_HOME),
        rundir.RUNS_DIR_ENV: str(state / RUNS),
        rundir.LEDGER_KEY_ENV: str(ledger_key),
        # The run ledgers' witnesses and the ledger key's public half, outside every run
        # directory (common.witness); fedpriv audit finds them beside STATE/runs.
        WITNESS_ENV: str(state / WITNESS_DIR),
    }
    checkpoint_key = keys / rundir.CHECKPOINT_KEY
    if checkpoint_key.exists():
        checkpoint.key_from_file(checkpoint_key)  # validates it (and its passphrase)
        env[checkpoint.KEY_FILE_ENV] = str(checkpoint_key)
    else:  # a sealing key given as $FEDPRIV_CHECKPOINT_KEY: the ServerApp processes need it
        env.update(secret_env.for_child(checkpoint.KEY_ENV))
    # Protected keys the ServerApp processes read (ledger signing, sealing): they need the passphrase.
    if any(path.is_file() and keyfiles.is_protected(path.read_bytes()) for path in (ledger_key, checkpoint_key)):
        env.update(secret_env.for_child(keyfiles.PASSPHRASE_ENV))
    node_keys = [p.resolve() for p in register] if register else sorted((keys / "nodes").glob("*.pub"))
    if not node_keys:
        raise DeploymentError(f"no node public keys to register in {keys / 'nodes'}; give --register FILE.pub")
    for path in node_keys:
        check_node_public_key(path)
    roster = (roster or keys / ROSTER).resolve()
    check_roster(roster, ca_path, node_keys)
    env[ROSTER_ENV] = str(roster)
    admin_port = port + 1 if admin_port is None else admin_port
    for flag, value in (("--port", port), ("--admin-port", admin_port)):
        if not 0 < value < 65536:
            raise DeploymentError(f"{flag} {value} is not a TCP port")
    if admin_port == port:
        raise DeploymentError("--admin-port must differ from --port")
    if not 0 <= internal_port < 65536 or internal_port in (port, admin_port):
        raise DeploymentError(f"--internal-port {internal_port} is not a free TCP port of its own")
    internal_port = internal_port or free_loopback_port()
    # Operators (and this command, to register nodes) reach the admin port by a name the
    # certificate carries: loopback when the SuperLink listens on every interface.
    names = subject_names(cert)
    admin_name = "127.0.0.1" if admin_host in ("0.0.0.0", "::", "") else admin_host
    if admin_name not in names:
        raise DeploymentError(f"the SuperLink certificate {cert_path} does not name {admin_name} (it names "
                              f"{', '.join(names) or 'nothing'}); create keys with --host {admin_name}")
    flower_key, pass_fds = keyfiles.key_for_flower(key_path)  # (checked readable above)
    argv = [
        flower_executable("flower-superlink"),
        "--ssl-ca-certfile", str(ca_path), "--ssl-certfile", str(cert_path), "--ssl-keyfile", flower_key,
        "--enable-supernode-auth",
        "--database", str(state / DATABASE),
        "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1", "--port", str(internal_port),
    ]
    return SuperLinkPlan(argv, flower_environment(env), state, ca_path, cert_path, key_path,
                         Address(admin_name, admin_port), Address(host, port), node_keys, roster,
                         Address("127.0.0.1", internal_port), admin_host, tuple(pass_fds))


def free_loopback_port() -> int:
    """A TCP port free on loopback now (for the SuperLink behind the gateways)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_roster(path: Path, ca_path: Path, node_keys: list[Path]) -> None:
    """The signed node roster must verify against the CA and name every node key registered."""
    from fedpriv.common.roster import RosterError, check_roster_file

    try:
        check_roster_file(path, ca_path, node_keys)
    except RosterError as exc:
        raise DeploymentError(f"node roster {path}: {exc}") from None


def write_connection(flwr_home: Path, address: Address | str, root_cert: Path | None) -> None:
    """A ``[superlink.fedpriv]`` connection in ``$FLWR_HOME/config.toml``, used by flwr: TLS with
    ``root_cert``, or plaintext (``None``: only for a hop that stays on this machine)."""
    security = f'root-certificates = "{root_cert.resolve()}"' if root_cert is not None else "insecure = true"
    write_atomic(flwr_home / "config.toml", (
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{address}"\n{security}\n'
    ).encode())


def register_node(public_key: Path, env: dict[str, str]) -> str:
    """Register one node key with the SuperLink; 'registered' or 'already registered'."""
    proc = subprocess.run(
        [flower_executable("flwr"), "supernode", "register", str(public_key), CONNECTION],
        env=env, capture_output=True, text=True, timeout=120,
    )
    text = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return "registered"
    if "already in use" in text:
        return "already registered"
    detail = next((ln.strip(" │") for ln in text.splitlines() if "code" in ln or "rror" in ln), text.strip())
    raise DeploymentError(f"the SuperLink refused to register {public_key}: {detail.strip()}")


def unregister_node(public_key: Path, state: Path) -> int:
    """Unregister the node of ``public_key`` from the running SuperLink of ``state`` (through its
    own loopback connection): it can no longer connect. Returns its node id."""
    import os

    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import ListNodesRequest, UnregisterNodeRequest

    check_node_public_key(public_key)
    wanted = try_load_public_key(public_key)  # the bytes Flower registered
    previous = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(state / FLWR_HOME)
    client = None
    try:
        client = init_http_client_from_connection(read_superlink_connection(CONNECTION))
        nodes = [n for n in client.ListNodes(ListNodesRequest()).nodes_info
                 if bytes(n.public_key) == wanted and n.status != "unregistered"]
        if not nodes:
            raise DeploymentError(f"no registered node has the key {public_key}")
        for node in nodes:
            client.UnregisterNode(UnregisterNodeRequest(node_id=node.node_id))
        return int(nodes[0].node_id)
    except DeploymentError:
        raise
    except Exception as exc:  # noqa: BLE001 - the SuperLink is not running, or refused
        raise DeploymentError(f"cannot unregister {public_key} at the SuperLink of {state} "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    finally:
        if client is not None:
            client.close()
        if previous is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = previous


def start_superlink(plan: SuperLinkPlan, out: Any = sys.stdout) -> int:
    """Run the SuperLink until it exits or this process is stopped; register the nodes, then
    open the public port (the Fleet-only gateway)."""
    private_dir(plan.state / RUNS)
    link = plan.state / KEYS_LINK  # where fedpriv server run --state finds the app-signing key
    if link.is_symlink() or not link.exists():
        link.unlink(missing_ok=True)
        link.symlink_to(plan.ca.parent, target_is_directory=True)
    write_connection(plan.state / FLWR_HOME, plan.internal, plan.ca)
    terminate_as_exit()  # a SIGTERM while starting up must still stop the SuperLink
    child = Child(plan.argv, plan.env, pass_fds=plan.pass_fds)
    gateway = Gateway(plan.public.host, plan.public.port, plan.cert, plan.key,
                      plan.internal.host, plan.internal.port, plan.ca)
    from fedpriv.common.ledger import load_or_create_signing_key
    from fedpriv.server.operators import OperatorGateway

    operators = OperatorGateway(plan.admin_host, plan.admin.port, plan.cert, plan.key, plan.internal.host,
                                plan.internal.port, plan.ca, plan.state,
                                load_or_create_signing_key(Path(plan.env[rundir.LEDGER_KEY_ENV])))
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if not child.running():
                errors = [ln for ln in child.tail if "ERROR" in ln or "rror" in ln]
                raise DeploymentError(f"flower-superlink exited with code {child.proc.returncode}"
                                      + (f": {errors[-1].strip()}" if errors else ""))
            try:
                check_tls(plan.internal, plan.ca, timeout=2.0)
                break
            except DeploymentError:
                if time.monotonic() > deadline:
                    raise DeploymentError(f"the SuperLink did not answer on {plan.internal} within "
                                          f"{READY_TIMEOUT:.0f} s") from None
                time.sleep(0.5)
        # One `flwr supernode register` per key, at once (each is a process of its own).
        with ThreadPoolExecutor(max_workers=min(8, len(plan.node_keys))) as pool:
            results = list(zip(plan.node_keys, pool.map(lambda path: register_node(path, plan.env), plan.node_keys)))
        for door, address in ((gateway, plan.public), (operators, plan.admin)):
            try:
                door.start()
            except OSError as exc:
                raise DeploymentError(f"cannot listen on {address}: {exc.strerror or exc}") from None
        write_atomic(plan.state / OPERATORS_FILE, json.dumps(
            {"address": str(plan.admin), "root_certificates": str(plan.ca)}, indent=1).encode())
    except BaseException:
        child.stop()
        raise
    for path, result in results:
        print(f"fedpriv: node key {path.name}: {result}", file=out)
    print(f"fedpriv: SuperLink ready: nodes connect to {plan.public} (TLS, node authentication, Fleet API "
          f"only); operators to {plan.admin} (mutual TLS with operator certificates, by role; log in "
          f"{plan.state / 'operator-log'}); database {plan.state / DATABASE}; runs are written "
          f"under {plan.state / RUNS}", file=out)
    print(f"fedpriv: submit a run with: fedpriv server run --state {plan.state} --operator-cert NAME.crt "
          f"--operator-key NAME.key (fedpriv keys --operator NAME --role researcher)", file=out, flush=True)
    try:
        return child.wait()
    finally:
        gateway.stop()
        operators.stop()


def app_defaults(app: Path) -> dict[str, Any]:
    """The app's run config defaults: ``[tool.flwr.app.config]`` of its pyproject.toml, flattened."""
    import tomllib

    try:
        table = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        raise DeploymentError(f"{app} is not a Flower app (no [tool.flwr.app.config] in pyproject.toml)") from None
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value
    walk("", table)
    return flat


def run_config_string(cfg: RunConfig, app: Path, signature: str = "") -> str:
    """The validated configuration as Flower ``--run-config``: every setting that differs from
    the app's defaults (Flower refuses keys the app does not declare), and the app's signature."""
    defaults = app_defaults(app)
    flat = {**cfg.to_flat(), SIGNATURE_SETTING: signature}
    changed = {k: v for k, v in flat.items() if k not in defaults or defaults[k] != v}
    unknown = sorted(k for k in changed if k not in defaults)
    if unknown:
        raise DeploymentError(f"the Flower app in {app} does not declare {', '.join(unknown)}; "
                              "it is older than this fedpriv")
    return " ".join(f"{k}={toml_value(v)}" for k, v in changed.items())


def default_app_dir() -> Path:
    """fedpriv's Flower app: the project directory holding pyproject.toml's [tool.flwr.app]."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").exists():
        raise DeploymentError("cannot find fedpriv's Flower app (pyproject.toml); give --app DIR")
    return root


def operators_port(state: Path, wait: float, client_cert: tuple[Path, Path]) -> tuple[Address, Path]:
    """The operators' port of ``fedpriv server start --state`` and its CA, once it answers a TLS
    handshake with the operator's certificate (waiting at most ``wait`` seconds: a run may be
    submitted while the server starts)."""
    path = state / OPERATORS_FILE
    deadline, last = time.monotonic() + wait, ""
    while True:
        if path.exists():
            try:
                raw = json.loads(path.read_text())
                address, ca = parse_address(raw["address"]), Path(raw["root_certificates"])
            except (KeyError, TypeError, ValueError, OSError):
                raise DeploymentError(f"{path} is not what fedpriv server start writes") from None
            try:
                check_tls(address, ca, timeout=2.0, client_cert=client_cert)
                return address, ca
            except DeploymentError as exc:
                last = str(exc)
        if time.monotonic() >= deadline:
            raise DeploymentError(last or f"no operators' port in {state} after {wait:g} s; start the server "
                                  f"with fedpriv server start --state {state}, or give --superlink and --root-cert")
        time.sleep(1.0)


def app_key_path(app_key: Path | None, state: Path | None, superlink: str | None, root_cert: Path | None) -> Path:
    """The app-signing key: ``--app-key``, else the one in the key directory of ``--root-cert``
    (with ``--superlink``) or of ``fedpriv server start --keys`` (with ``--state``)."""
    if app_key is not None:
        return app_key
    if superlink and root_cert is not None:
        path = root_cert.parent / APP_KEY
    elif state is not None:
        path = state / KEYS_LINK / APP_KEY
    else:
        raise DeploymentError("give --state (the directory of fedpriv server start) or --superlink")
    if not path.exists():
        raise DeploymentError(f"no app-signing key at {path}: fedpriv nodes run only signed apps; give --app-key "
                              f"FILE (fedpriv keys writes {APP_KEY}; fedpriv keys --out DIR --app-key-only adds one)")
    return path


def signed_app(app: Path, key_path: Path, dest: Path) -> str:
    """Snapshot ``app`` into ``dest`` (what ``flwr run dest`` sends) and sign its bundle."""
    key = load_signing_key(key_path)
    return sign_app(snapshot_app(app, dest), key)


def submit_run(cfg: RunConfig, state: Path | None, superlink: str | None, root_cert: Path | None,
               app: Path | None = None, out: Any = sys.stdout, wait: float = 120.0,
               app_key: Path | None = None, operator_cert: Path | None = None,
               operator_key: Path | None = None) -> tuple[int, str | None]:
    """``flwr run APP fedpriv --stream`` through the operators' port as the operator of
    ``operator_cert``, the app signed; returns its exit code and the run directory it reported."""
    app = (app or default_app_dir()).resolve()
    if not (app / "pyproject.toml").exists():
        raise DeploymentError(f"{app} is not a Flower app (no pyproject.toml)")
    if operator_cert is None or operator_key is None:
        raise DeploymentError("the operators' port needs your operator certificate: give --operator-cert NAME.crt "
                              "and --operator-key NAME.key (fedpriv keys --out KEYS --operator NAME --role "
                              "researcher issues them)")
    credentials = (operator_cert, operator_key)
    load_certificate(operator_cert, "operator certificate")
    with tempfile.TemporaryDirectory(prefix="fedpriv-flwr-") as scratch:
        if superlink:
            if root_cert is None:
                raise DeploymentError("--superlink needs --root-cert (the federation's CA certificate)")
            address = parse_address(superlink, "--superlink")
            load_certificate(root_cert, "root certificate")
            check_tls(address, root_cert, client_cert=credentials)
        else:
            if state is None:
                raise DeploymentError("give --state (the directory of fedpriv server start) or --superlink")
            address, root_cert = operators_port(state.resolve(), wait, credentials)
        forwarder = Forwarder(0, address.host, address.port, root_cert, credentials)
        forwarder.start()
        flwr_home = Path(scratch) / "flwr"
        # the hop to the forwarder stays on this machine
        write_connection(flwr_home, f"127.0.0.1:{forwarder.port}", None)
        found: dict[str, str] = {}

        def on_line(line: str) -> None:
            match = RUN_WRITTEN.search(line)
            if match:
                found["run_dir"] = match.group(1)

        # (with --state, the key directory is known once fedpriv server start has begun)
        key_path = app_key_path(app_key, state, superlink, root_cert)
        snapshot = Path(scratch) / "app"
        signature = signed_app(app, key_path, snapshot)
        argv = [flower_executable("flwr"), "run", str(snapshot), CONNECTION,
                "--run-config", run_config_string(cfg, snapshot, signature), "--stream"]
        child = Child(argv, flower_environment({"FLWR_HOME": str(flwr_home)}), sink=out, on_line=on_line)
        try:
            code = child.wait()
        finally:
            forwarder.stop()
        if code != 0 and not found:
            errors = [ln for ln in child.tail if "rror" in ln]
            raise DeploymentError(f"flwr run failed with code {code}" + (f": {errors[-1].strip()}" if errors else ""))
        return code, found.get("run_dir")
