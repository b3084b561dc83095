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
    keys.add_argument("--out", type=Path, metavar="DIR", help="where to write the keys (required)")
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
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="COMMAND")
    rotate = keys_sub.add_parser(
        "rotate", help="rotate the sealing key: seal every given run's files and data files again",
        description=(
            "Replace the sealing key in its file (--key-file; default $FEDPRIV_CHECKPOINT_KEY_FILE, else "
            "STATE/keys/checkpoint.key for runs under STATE/runs, else $FEDPRIV_HOME/keys/checkpoint.key) "
            "with a new one: every RUN_DIR's sealed checkpoint and model, and every --data file, is opened "
            "with the old key and sealed again with the new one, and each run's ledger records the rotation "
            "in a signed key_rotation entry (signed with the run's ledger-signing key: --ledger-key, else the "
            "server state's, else $FEDPRIV_HOME's). A protected key file stays protected with the same "
            "passphrase. Stop the server and any run first, and give every run and data file sealed with "
            "the key: the old key is gone afterwards. Interrupted, it can be run again with the same "
            "arguments to finish: the new key waits in KEYFILE.next until every file is done."
        ),
    )
    rotate.add_argument("runs", metavar="RUN_DIR", type=Path, nargs="*", help="runs whose sealed files to rotate")
    rotate.add_argument("--data", type=Path, action="append", default=[], metavar="FILE",
                        help="a sealed data file to rotate too (repeatable)")
    rotate.add_argument("--key-file", type=Path, metavar="FILE", help="the sealing key file to rotate")
    rotate.add_argument("--ledger-key", type=Path, metavar="FILE", help="the runs' ledger-signing key")
    rotate.set_defaults(func=cmd_keys_rotate)
    token = keys_sub.add_parser(
        "pkcs11", help="generate the sealing and ledger-signing keys inside a PKCS#11 token",
        description=(
            "Generate, inside a PKCS#11 token (a hardware security module, or SoftHSM2), a non-extractable "
            "AES-256 sealing key and a non-extractable Ed25519 ledger-signing key, labelled as the two URIs "
            "say. The PKCS#11 library is $FEDPRIV_PKCS11_MODULE; the user PIN comes from the file "
            "$FEDPRIV_PKCS11_PIN_FILE names, or $FEDPRIV_PKCS11_PIN. Then point fedpriv at them: "
            "FEDPRIV_CHECKPOINT_KEY_FILE=SEALING_URI and FEDPRIV_LEDGER_KEY=SIGNING_URI; checkpoints and "
            "models are sealed, and ledgers signed, inside the token."
        ),
    )
    token.add_argument("--sealing", required=True, metavar="URI", help="e.g. pkcs11:token=fedpriv;object=sealing")
    token.add_argument("--signing", required=True, metavar="URI", help="e.g. pkcs11:token=fedpriv;object=ledger")
    token.set_defaults(func=cmd_keys_pkcs11)


def cmd_keys_pkcs11(args: argparse.Namespace) -> int:
    from fedpriv.common import key_providers
    from fedpriv.common.ledger import public_pem

    key_providers.parse_uri(args.sealing), key_providers.parse_uri(args.signing)
    key_providers.generate(args.sealing, args.signing)
    signer = key_providers.Pkcs11SigningKey(args.signing)
    print(f"generated in the token: {args.sealing} (AES-256) and {args.signing} (Ed25519), neither extractable")
    print("the ledger-signing key's public half (pin it in audits):")
    print(public_pem(signer.public_key()).decode().strip())
    return EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    import os

    from fedpriv.common import checkpoint, rundir
    from fedpriv.common.errors import FedprivError
    from fedpriv.common.rotation import rotate

    if not args.runs and not args.data:
        raise FedprivError("nothing to rotate: give RUN_DIR(s) and/or --data FILE")
    key_file = args.key_file
    if key_file is None and os.environ.get(checkpoint.KEY_FILE_ENV):
        key_file = Path(os.environ[checkpoint.KEY_FILE_ENV])
    if key_file is None and args.runs:
        state_key = rundir.state_of_run(args.runs[0]) / rundir.STATE_KEYS_LINK / rundir.CHECKPOINT_KEY
        key_file = state_key if state_key.is_file() else None
    key_file = key_file or checkpoint.default_key_path()
    done = rotate(key_file, args.runs, args.data, args.ledger_key)
    for path in done.resealed:
        print(f"sealed again  {path}")
    for path in done.already:
        print(f"already new   {path}")
    for run in done.recorded:
        print(f"recorded      {run / 'ledger.jsonl'}")
    print(f"rotated the sealing key in {key_file}: {done.old_id} -> {done.new_id}")
    print("files sealed with the old key that were not given here can no longer be opened")
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    from fedpriv.common.keyfiles import new_passphrase_required
    from fedpriv.common.keys import app_signing_keys, federation_keys, roster_file, write_keys
    from fedpriv.common.fileio import write_atomic

    if args.out is None:
        from fedpriv.common.errors import FedprivError

        raise FedprivError("--out DIR is required (or a command: fedpriv keys rotate)")
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
