"""``fedpriv keys``: the key material of a real federation (see common/keys.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

EXIT_OK = 0


def add_parser(sub: Any) -> None:
    keys = sub.add_parser(
        "keys", help="create the CA, TLS, node-authentication and ledger keys of a federation",
        description=(
            "Create in DIR: a federation CA (ca.crt, ca.key), the SuperLink's TLS certificate "
            "signed by it with every --host as a subject alternative name (superlink.crt, "
            "superlink.key), node authentication key pairs in the OpenSSH format Flower's "
            "SuperNode reads (nodes/node-N, nodes/node-N.pub; register the .pub files with the "
            "SuperLink), the server's ledger-signing key (ledger-signing.key, "
            "ledger-signing.pub), the app-signing key (app-signing.key, app-signing.pub: nodes run "
            "only Flower apps signed with it; fedpriv server run signs with it, give nodes the .pub), "
            "an AES-256 checkpoint key (checkpoint.key; point "
            "$FEDPRIV_CHECKPOINT_KEY_FILE at it), and the node roster (roster.signed: the node keys "
            "signed by the CA, against which nodes check each other's SecAgg+ keys). Private keys get "
            "mode 0600. Existing files are never replaced unless --force is given; then nothing at all "
            "is written. With --sign-roster, only roster.signed is written again, over DIR/nodes/*.pub "
            "and every --node-key (keep ca.key offline: sign there, copy roster.signed to the server). "
            "With --app-key-only, only the app-signing key pair is written (for a key directory made "
            "before fedpriv signed apps). With --operator NAME --role ROLE, only an operator's "
            "key and client certificate signed by DIR/ca.key are written (operators/NAME.key, "
            "operators/NAME.crt): admin (register and revoke nodes, stop runs), researcher (submit "
            "runs, follow its own) or auditor (list runs and nodes; read ledgers and reports)."
        ),
    )
    keys.add_argument("--out", required=True, type=Path, metavar="DIR", help="where to write the keys")
    keys.add_argument("--host", dest="hosts", action="append", default=[], metavar="NAME",
                      help="a DNS name or IP address the SuperLink is reached at (repeatable; "
                           "localhost and 127.0.0.1 are always included)")
    keys.add_argument("--nodes", type=int, default=2, metavar="N", help="node key pairs to create (default 2)")
    keys.add_argument("--days", type=int, default=365, help="certificate validity in days (default 365)")
    keys.add_argument("--force", action="store_true", help="replace existing key files")
    keys.add_argument("--protect", action="store_true",
                      help="protect every private key and the checkpoint key with a passphrase (PKCS#8 with "
                           "scrypt and AES-256), read from the file $FEDPRIV_KEY_PASSPHRASE_FILE names or from "
                           "$FEDPRIV_KEY_PASSPHRASE, never from the command line; every fedpriv command that "
                           "reads a key then needs the same variable")
    keys.add_argument("--sign-roster", action="store_true",
                      help="only re-sign DIR/roster.signed with DIR/ca.key (after nodes join)")
    keys.add_argument("--node-key", dest="node_keys", action="append", default=[], type=Path, metavar="F.pub",
                      help="with --sign-roster: a further node public key to put on the roster (repeatable)")
    keys.add_argument("--app-key-only", action="store_true",
                      help="only write the app-signing key pair (app-signing.key, app-signing.pub)")
    keys.add_argument("--operator", metavar="NAME",
                      help="only issue an operator certificate for NAME (with --role), signed by DIR/ca.key")
    keys.add_argument("--role", choices=("admin", "researcher", "auditor"),
                      help="with --operator: what the operator may do on the operators' port")
    keys.set_defaults(func=cmd_keys)


def cmd_keys(args: argparse.Namespace) -> int:
    from fedpriv.common.keyfiles import new_passphrase_required
    from fedpriv.common.keys import app_signing_keys, federation_keys, roster_file, write_keys
    from fedpriv.common.fileio import write_atomic

    secret = new_passphrase_required() if args.protect else None
    if args.sign_roster:
        roster = roster_file(args.out, args.node_keys)
        write_atomic(roster.path, roster.data)
        print(f"public   {roster.path}")
        print("next: give it to fedpriv server start (DIR/roster.signed, or --roster FILE) and restart it")
        return EXIT_OK
    if args.node_keys:
        from fedpriv.common.errors import FedprivError

        raise FedprivError("--node-key goes with --sign-roster")
    if args.operator or args.role:
        return _issue_operator(args, secret)
    if args.app_key_only:
        files = app_signing_keys(args.out, secret)
        write_keys(files, args.force)
        _print_files(files)
        print(f"next: give each node {args.out / 'app-signing.pub'} (fedpriv node join --trust); "
              f"fedpriv server run signs with {args.out / 'app-signing.key'}")
        return EXIT_OK
    files = federation_keys(args.out, args.hosts, args.nodes, args.days, secret)
    write_keys(files, args.force)
    _print_files(files)
    print(f"next: start the SuperLink with {args.out / 'superlink.crt'} and register each "
          f"{args.out / 'nodes'}/node-N.pub; give each node its private key, {args.out / 'ca.crt'} "
          f"and {args.out / 'app-signing.pub'}")
    return EXIT_OK


def _issue_operator(args: argparse.Namespace, secret: bytes | None) -> int:
    from fedpriv.common.errors import FedprivError
    from fedpriv.common.keys import CA_CERT, CA_KEY, KeyFile, write_keys
    from fedpriv.common.operators import OPERATORS_DIR, issue_operator

    if not (args.operator and args.role):
        raise FedprivError("--operator NAME and --role ROLE go together")
    try:
        ca_cert, ca_key = (args.out / CA_CERT).read_bytes(), (args.out / CA_KEY).read_bytes()
    except OSError as exc:
        raise FedprivError(f"cannot read the federation CA in {args.out} ({exc.strerror}); "
                           "issue operator certificates where ca.key is") from None
    key_pem, cert_pem = issue_operator(ca_cert, ca_key, args.operator, args.role, args.days, secret)
    folder = args.out / OPERATORS_DIR
    files = [KeyFile(folder / f"{args.operator}.key", key_pem, True),
             KeyFile(folder / f"{args.operator}.crt", cert_pem, False)]
    write_keys(files, args.force)
    _print_files(files)
    print(f"next: give {args.operator} both files and {args.out / CA_CERT}; they reach the operators' port "
          f"with fedpriv operator connect (or fedpriv server run --operator-cert/--operator-key)")
    return EXIT_OK


def _print_files(files: list) -> None:
    """One line per written key file: whether it is private, and where."""
    for f in files:
        print(f"{'private' if f.private else 'public '}  {f.path}")
