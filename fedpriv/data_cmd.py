"""``fedpriv data seal IN --out OUT``: a node's data file encrypted at rest (AES-256-GCM), which
``fedpriv node join --data`` and simulations (``data.path``) read directly, decrypting in memory."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

EXIT_OK = 0


def add_parser(sub: Any) -> None:
    data = sub.add_parser("data", help="seal a node's data file",
                          description="Work with the data files nodes train on.")
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    seal = data_sub.add_parser(
        "seal", help="encrypt a data file at rest, for fedpriv node join --data",
        description=(
            "Read IN (.npz with arrays x and y, or .csv with a label column), check that it is usable "
            "training data, and write OUT: the same arrays sealed with AES-256-GCM under the sealing key "
            "($FEDPRIV_CHECKPOINT_KEY, $FEDPRIV_CHECKPOINT_KEY_FILE, else $FEDPRIV_HOME/keys/checkpoint.key, "
            "created on first use). fedpriv node join --data OUT and simulations with data.path = OUT "
            "read it directly and decrypt it in memory only; any altered byte or a wrong key is refused. "
            "IN is left as it is: delete it once OUT is in place."
        ),
    )
    seal.add_argument("input", metavar="IN", type=Path)
    seal.add_argument("--out", required=True, type=Path, metavar="OUT", help="the sealed file to write")
    seal.add_argument("--label-column", default="label", metavar="NAME",
                      help="the label column of a .csv file (default: label)")
    seal.add_argument("--force", action="store_true", help="replace OUT if it exists")
    seal.set_defaults(func=cmd_data_seal)


def cmd_data_seal(args: argparse.Namespace) -> int:
    from fedpriv.common import checkpoint, fileio
    from fedpriv.common.data import load_file, normalise
    from fedpriv.common.errors import FedprivError

    if args.out.exists() and not args.force:
        raise FedprivError(f"{args.out} exists; pass --force to replace it")
    if args.out.resolve() == args.input.resolve():
        raise FedprivError("--out must differ from IN (IN is never overwritten)")
    if checkpoint.is_sealed(args.input):
        raise FedprivError(f"{args.input} is already sealed")
    x, y = load_file(str(args.input), args.label_column)
    normalise(x, y, source=str(args.input))  # refuse what no node could train on, before sealing it
    key = checkpoint.ensure_key()
    fileio.write_atomic(args.out, checkpoint.seal_data(x, y, key, source=args.input.name))
    print(f"sealed {len(y)} examples of {args.input} into {args.out} (AES-256-GCM, key "
          f"{checkpoint.key_id(key)} from {checkpoint.key_source()})")
    print(f"{args.input} is unchanged: delete it once {args.out} is where the node reads it")
    return EXIT_OK
