"""Real federations: ``fedpriv server start|run``, ``fedpriv node join``, ``fedpriv app sign``,
``fedpriv split-data``."""

from __future__ import annotations

import argparse
import io
import shlex
import sys
from pathlib import Path
from typing import Any

DEFAULT_PORT = 9092


def _config_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--preset", default=None, help=f"named configuration of {what} (default: quickstart)")
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings, applied on the preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting (repeatable); 'fedpriv config' lists them")


def add_parser(sub: Any) -> None:
    server = sub.add_parser(
        "server", help="run a real federation's SuperLink, and submit runs to it",
        description="Run Flower's SuperLink with TLS and node authentication (start), and submit "
                    "fedpriv runs to it (run).")
    server_sub = server.add_subparsers(dest="server_command", metavar="COMMAND", required=True)

    start = server_sub.add_parser(
        "start", help="run the SuperLink: TLS, node authentication, persistent state",
        description=(
            "Check the key material in --keys (see 'fedpriv keys'), then run flower-superlink with "
            "TLS, --enable-supernode-auth, a persistent --database in STATE and runtime dependency "
            "installation off on a loopback port of its own (--internal-port), register the node "
            "public keys (every KEYS/nodes/*.pub unless --register is given; keys already registered "
            "are kept), and open two TLS gateways: the nodes' port (--host/--port), which serves "
            "Flower's Fleet API and refuses everything else, and the operators' port "
            "(--admin-host/--admin-port, loopback by default), which requires an operator "
            "certificate from the CA (fedpriv keys --operator) and allows each Control API call "
            "only to the roles that may make it, logging every attempt in STATE/operator-log. Runs sign their ledgers with "
            "KEYS/ledger-signing.key, seal checkpoints with KEYS/checkpoint.key, send nodes the node "
            "roster KEYS/roster.signed (signed by the CA; every registered key must be on it) and are "
            "written under STATE/runs. Runs until stopped (Ctrl-C or SIGTERM)."),
    )
    start.add_argument("--keys", required=True, type=Path, metavar="DIR", help="the output of fedpriv keys")
    start.add_argument("--state", type=Path, default=Path("fedpriv-server"), metavar="DIR",
                       help="database, run directories and flwr connection (default: ./fedpriv-server)")
    start.add_argument("--host", default="0.0.0.0",
                       help="interface the nodes' port listens on (default 0.0.0.0: every interface)")
    start.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help=f"the nodes' TLS port: Flower's Fleet API only (default {DEFAULT_PORT})")
    start.add_argument("--admin-host", default="127.0.0.1",
                       help="interface of the operators' port: mutual TLS, Control API calls by role "
                            "(default 127.0.0.1: this machine only; it must be a name in the certificate)")
    start.add_argument("--admin-port", type=int, metavar="PORT",
                       help="the operators' TLS port (default: --port + 1)")
    start.add_argument("--internal-port", type=int, default=0, metavar="PORT",
                       help="loopback port of the SuperLink itself, behind both gateways (default 0: any free one)")
    start.add_argument("--register", action="append", type=Path, metavar="FILE.pub",
                       help="a node public key to register (repeatable; default: KEYS/nodes/*.pub)")
    start.add_argument("--roster", type=Path, metavar="FILE",
                       help="the signed node roster (default: KEYS/roster.signed; re-sign it with "
                            "fedpriv keys --sign-roster where the CA key is)")
    start.add_argument("--dry-run", action="store_true", help="check everything, print the command, start nothing")
    start.set_defaults(func=cmd_server_start)

    run = server_sub.add_parser(
        "run", help="submit a fedpriv run to a SuperLink and stream it",
        description=(
            "Validate the run configuration (--preset/--config/--set, as for simulate), then submit "
            "fedpriv's Flower app with it (flwr run --stream) to the SuperLink of --state, or to "
            "--superlink HOST:PORT verified against --root-cert. The app bundle is signed with the "
            "federation's app-signing key (--app-key; default: app-signing.key in the key directory "
            "of fedpriv server start --keys, or beside --root-cert), since fedpriv nodes run only "
            "signed apps. Prints the run directory (on the "
            "SuperLink's machine) when the run ends; audit it there with 'fedpriv audit'."),
    )
    run.add_argument("--state", type=Path, metavar="DIR", help="the --state of fedpriv server start")
    run.add_argument("--superlink", metavar="HOST:PORT", help="a SuperLink elsewhere (needs --root-cert)")
    run.add_argument("--root-cert", type=Path, metavar="CA", help="the federation's CA certificate")
    run.add_argument("--app", type=Path, metavar="DIR", help="fedpriv's Flower app (default: this installation)")
    run.add_argument("--app-key", type=Path, metavar="FILE",
                     help="the app-signing key (default: KEYS/app-signing.key of fedpriv server start, "
                          "or app-signing.key beside --root-cert)")
    run.add_argument("--operator-cert", type=Path, metavar="FILE",
                     help="your operator certificate (fedpriv keys --operator NAME --role researcher)")
    run.add_argument("--operator-key", type=Path, metavar="FILE", help="its private key")
    run.add_argument("--wait", type=float, default=120.0, metavar="SECONDS",
                     help="with --state: how long to wait for a SuperLink that is still starting (default 120)")
    _config_options(run, "the run")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue this run (a run directory in the server's --state, read here) from "
                          "its latest checkpoint with the configuration its ledger recorded, then --config "
                          "and --set (as fedpriv simulate --resume); --set run.rounds=N to extend it")
    run.add_argument("--dry-run", action="store_true", help="validate and print the command, submit nothing")
    run.set_defaults(func=cmd_server_run)

    revoke = server_sub.add_parser(
        "revoke", help="revoke an operator certificate or a node key, without a restart",
        description=(
            "On the server machine: --operator-cert FILE adds the certificate to STATE/revoked.json, "
            "which the operators' port reads on every request; --node KEY.pub unregisters the node "
            "key from the running SuperLink (it can no longer connect; re-sign the roster without it "
            "where the CA key is)."),
    )
    revoke.add_argument("--state", type=Path, default=Path("fedpriv-server"), metavar="DIR",
                        help="the --state of fedpriv server start (default: ./fedpriv-server)")
    revoke.add_argument("--operator-cert", type=Path, metavar="FILE", help="the operator certificate to revoke")
    revoke.add_argument("--node", type=Path, metavar="KEY.pub", help="the node public key to unregister")
    revoke.set_defaults(func=cmd_server_revoke)

    node = sub.add_parser("node", help="join a real federation as a client node",
                          description="Join a federation with this machine's own data (join).")
    node_sub = node.add_subparsers(dest="node_command", metavar="COMMAND", required=True)
    join = node_sub.add_parser(
        "join", help="connect this machine and its data file to a federation",
        description=(
            "Check the data file against the federation's configuration (--preset/--config/--set; "
            "the same as the server's), the node key and the CA certificate, that the SuperLink is "
            "reachable (bounded retries) and presents a certificate the CA signed; then run a "
            "SuperNode with TLS and node authentication and fedpriv's ClientApp. The node runs only "
            "Flower apps whose bundle is signed by a key it trusts (--trust; default: app-signing.pub "
            "beside --root-cert), checked before any of the app's code is installed. The node enforces "
            "its own record-level budget (--budget), kept in a signed ledger under --state, so its "
            "spending carries across runs and restarts. Refuses to run without TLS unless --insecure."),
    )
    join.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    join.add_argument("--root-cert", type=Path, metavar="CA", help="the federation's CA certificate (ca.crt)")
    join.add_argument("--auth-key", type=Path, metavar="KEY",
                      help="this node's private key (nodes/node-N from fedpriv keys)")
    join.add_argument("--data", required=True, type=Path, metavar="PATH",
                      help="this node's training data: .npz (arrays x, y) or .csv")
    join.add_argument("--budget", type=float, metavar="EPS",
                      help="this node's record-level epsilon budget over all runs "
                           "(default: its policy's budget_total, 10 without --policy)")
    join.add_argument("--name", help="this node's name (default: the key file's name)")
    join.add_argument("--state", type=Path, metavar="DIR",
                      help="where the node keeps its spending ledger (default: $FEDPRIV_HOME/nodes, "
                           "~/.fedpriv/nodes)")
    join.add_argument("--port", type=int, default=9094,
                      help="local port of the SuperNode's ClientApp API (default 9094; one per node)")
    join.add_argument("--max-retries", type=int, default=8,
                      help="connection attempts before giving up (default 8)")
    join.add_argument("--max-wait", type=float, default=120.0, metavar="SECONDS",
                      help="longest time to keep reconnecting (default 120)")
    join.add_argument("--trust", action="append", default=[], type=Path, metavar="KEY.pub",
                      help="an app-signing public key whose signed apps this node runs (repeatable; "
                           "default: app-signing.pub beside --root-cert)")
    join.add_argument("--policy", type=Path, metavar="FILE.toml",
                      help="this node's privacy floor (what runs it accepts: DP, noise, SecAgg+ shares, "
                           "budgets, clients per round, models); default: record-level DP with noise >= 0.5, "
                           "SecAgg+ with >= 3 shares, a budget of 10 over all runs. See docs/deployment.md")
    join.add_argument("--insecure", action="store_true",
                      help="no TLS and no node authentication (trusted test networks only)")
    _config_options(join, "the federation")
    join.add_argument("--dry-run", action="store_true", help="check everything, print the command, start nothing")
    join.set_defaults(func=cmd_node_join)

    app_parser = sub.add_parser("app", help="sign a Flower app for fedpriv nodes",
                                description="Sign Flower app bundles for the nodes of a federation (sign).")
    app_sub = app_parser.add_subparsers(dest="app_command", metavar="COMMAND", required=True)
    sign = app_sub.add_parser(
        "sign", help="print the --run-config setting that lets fedpriv nodes run an app",
        description=(
            "Build the Flower app bundle (FAB) of APP_DIR exactly as 'flwr run APP_DIR' does, sign "
            "its hash with the app-signing key, and print the setting to add to flwr run: "
            "flwr run APP_DIR CONNECTION --run-config 'run.app_signature=\"...\"'. Nodes check it "
            "before they install the app; any change to the app's files needs a new signature. "
            "fedpriv server run does this by itself."),
    )
    sign.add_argument("--key", required=True, type=Path, metavar="KEY", help="the app-signing key (app-signing.key)")
    sign.add_argument("app_dir", nargs="?", type=Path, default=Path("."), metavar="APP_DIR",
                      help="the Flower app's directory (default: .)")
    sign.set_defaults(func=cmd_app_sign)

    split = sub.add_parser(
        "split-data", help="write the configured dataset's training partitions as node data files",
        description=(
            "Split the training data of the configured dataset (default: the built-in 5,000 MNIST "
            "digits) with the configured partitioning into one .npz file per node (arrays x, y): "
            "data files to try a real federation with 'fedpriv node join --data'. With --seal, each "
            "is written sealed instead (node-N.sealed, as 'fedpriv data seal' writes it)."),
    )
    split.add_argument("--out", required=True, type=Path, metavar="DIR")
    split.add_argument("--nodes", type=int, default=2, metavar="N", help="number of files (default 2)")
    split.add_argument("--seal", action="store_true",
                       help="encrypt each file at rest with the sealing key, as 'fedpriv data seal' does")
    _config_options(split, "the federation")
    split.set_defaults(func=cmd_split_data)


def _resolve(args: argparse.Namespace, resume: Path | None = None) -> Any:
    from fedpriv.common.settings import resolve_config

    return resolve_config(args.preset, args.config, args.overrides, resume=resume)


def cmd_server_start(args: argparse.Namespace) -> int:
    from fedpriv.server.superlink import plan_superlink, start_superlink

    plan = plan_superlink(args.keys, args.state, args.host, args.port, args.register,
                          args.admin_host, args.admin_port, args.roster, args.internal_port)
    if args.dry_run:
        print(shlex.join(plan.argv))
        for path in plan.node_keys:
            print(f"register {path}")
        return 0
    return start_superlink(plan)


def cmd_server_revoke(args: argparse.Namespace) -> int:
    from fedpriv.common.errors import FedprivError

    if (args.operator_cert is None) == (args.node is None):
        raise FedprivError("give one of --operator-cert FILE or --node KEY.pub")
    state = args.state.resolve()
    if not state.is_dir():
        raise FedprivError(f"no server state at {state} (the --state of fedpriv server start)")
    if args.operator_cert is not None:
        from fedpriv.server.operators import revoke_operator

        who = revoke_operator(state, args.operator_cert)
        print(f"fedpriv: revoked {who.name} ({who.role}, serial {who.serial}); the operators' port refuses it "
              "from its next request")
        return 0
    from fedpriv.server.superlink import unregister_node

    node_id = unregister_node(args.node, state)
    print(f"fedpriv: unregistered node {node_id} ({args.node.name}); it can no longer connect")
    return 0


def cmd_server_run(args: argparse.Namespace) -> int:
    from fedpriv.server.superlink import app_key_path, default_app_dir, run_config_string, signed_app, submit_run

    # --resume means what it means for fedpriv simulate: the run's recorded configuration, then
    # --config and --set; a relaxed budget is refused here, before anything is submitted.
    cfg = _resolve(args, resume=Path(args.resume) if args.resume else None)
    if args.dry_run:
        import tempfile

        app = (args.app or default_app_dir()).resolve()
        key = app_key_path(args.app_key, args.state, args.superlink, args.root_cert)
        with tempfile.TemporaryDirectory(prefix="fedpriv-app-") as scratch:
            signature = signed_app(app, key, Path(scratch))
        print(shlex.join(["flwr", "run", str(app), "fedpriv", "--run-config",
                          run_config_string(cfg, app, signature), "--stream"]))
        return 0
    code, run_dir = submit_run(cfg, args.state, args.superlink, args.root_cert, args.app, wait=args.wait,
                               app_key=args.app_key, operator_cert=args.operator_cert,
                               operator_key=args.operator_key)
    if run_dir:
        print(f"fedpriv: run directory (on the SuperLink's machine): {run_dir}")
        print(f"fedpriv: audit it with: fedpriv audit {run_dir}")
    return code


def cmd_node_join(args: argparse.Namespace) -> int:
    from fedpriv.clients.supernode import INSECURE_WARNING, describe, join, plan_join

    if args.insecure and (args.root_cert or args.auth_key):
        print("fedpriv: --insecure ignores --root-cert and --auth-key", file=sys.stderr)
    plan = plan_join(_resolve(args), args.superlink, args.data, args.root_cert, args.auth_key,
                     args.budget, args.name, args.state, args.insecure, args.port,
                     args.max_retries, args.max_wait, args.trust, args.policy)
    if args.dry_run:
        if args.insecure:
            print(INSECURE_WARNING, file=sys.stderr)
        print(f"fedpriv: {describe(plan)}")
        print(shlex.join(plan.argv))
        if plan.gate_argv:  # started beside the SuperNode, in place of Flower's SuperExec
            from fedpriv.common.appsign import TRUST_ENV

            print(f"{TRUST_ENV}={shlex.quote(plan.gate_env[TRUST_ENV])} {shlex.join(plan.gate_argv)} "
                  f"--parent-pid SUPERNODE_PID")
        return 0
    return join(plan)


def cmd_app_sign(args: argparse.Namespace) -> int:
    from fedpriv.common.appsign import SIGNATURE_SETTING, fab_hash, fingerprint, load_signing_key, sign_app, snapshot_app
    from fedpriv.common.errors import FedprivError

    import tempfile

    app = args.app_dir.resolve()
    if not (app / "pyproject.toml").is_file():
        raise FedprivError(f"{app} is not a Flower app (no pyproject.toml)")
    key = load_signing_key(args.key)
    with tempfile.TemporaryDirectory(prefix="fedpriv-app-") as scratch:
        fab = snapshot_app(app, Path(scratch))  # checks that flwr run rebuilds the same bytes
    print(f"{SIGNATURE_SETTING}=\"{sign_app(fab, key)}\"")
    print(f"fedpriv: signed app bundle {fab_hash(fab)[:12]} of {app} with key {fingerprint(key.public_key())}; "
          f"add the line above to flwr run's --run-config (the app must declare {SIGNATURE_SETTING} = \"\" "
          f"in [tool.flwr.app.config]); change any file and it needs signing again", file=sys.stderr)
    return 0


def cmd_split_data(args: argparse.Namespace) -> int:
    import numpy as np

    from fedpriv.common import checkpoint
    from fedpriv.common.data import load_dataset
    from fedpriv.common.errors import FedprivError
    from fedpriv.common.partition import partition
    from fedpriv.common.fileio import private_dir, write_atomic

    if args.nodes < 1:
        raise FedprivError(f"--nodes must be at least 1, got {args.nodes}")
    cfg = _resolve(args)
    dataset = load_dataset(cfg.data, cfg.run.seed)
    parts = partition(dataset.y_train, args.nodes, cfg.data, cfg.run.seed)
    private_dir(args.out)
    key = checkpoint.ensure_key() if args.seal else None
    for number, indices in enumerate(parts, start=1):
        x, y = dataset.x_train[indices], dataset.y_train[indices]
        if key is not None:
            path = args.out / f"node-{number}.sealed"
            write_atomic(path, checkpoint.seal_data(x, y, key, source=f"{dataset.name} share {number}"))
        else:
            buffer = io.BytesIO()
            np.savez(buffer, x=x, y=y)
            path = args.out / f"node-{number}.npz"
            write_atomic(path, buffer.getvalue())
        print(f"{path}  {len(indices)} examples of {dataset.name}{' (sealed)' if key is not None else ''}")
    return 0
