"""``fedpriv model export RUN_DIR --out FILE``: a plaintext copy of a run's sealed final model,
written on purpose, with the run's audited privacy statement beside it."""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import io
from pathlib import Path
from typing import Any

EXIT_OK = 0
FORMATS = (".npz", ".keras")
STATEMENT_SUFFIX = ".privacy.json"


def add_parser(sub: Any) -> None:
    model = sub.add_parser("model", help="export a run's sealed model",
                           description="Work with the sealed model a run leaves (RUN_DIR/model.sealed).")
    model_sub = model.add_subparsers(dest="model_command", metavar="COMMAND", required=True)
    export = model_sub.add_parser(
        "export", help="write a plaintext copy of a run's final model, with its privacy statement",
        description=(
            "Unseal RUN_DIR/model.sealed with the sealing key ($FEDPRIV_CHECKPOINT_KEY, "
            "$FEDPRIV_CHECKPOINT_KEY_FILE, else the default key fedpriv simulate made), after checking "
            "that it is this run's model (its binding names the run id of the run's verified ledger), "
            "and write it to FILE in plaintext: .npz (the arrays in layer order, arr_0, arr_1, ...) or "
            ".keras (the whole Keras model). The run's audit (fedpriv audit) runs first; its epsilons, "
            f"budgets and verdict are written beside the copy, as FILE{STATEMENT_SUFFIX}. A run whose ledger "
            "does not verify is not exported. The copy is owner-only (0600) but not encrypted: it is "
            "protected by the differential privacy its statement gives, and nothing else."
        ),
    )
    export.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    export.add_argument("--out", required=True, type=Path, metavar="FILE",
                        help="the plaintext copy to write: FILE.npz or FILE.keras")
    export.add_argument("--public-key", type=Path, metavar="FILE",
                        help="the trusted ledger public key for the audit (as fedpriv audit --public-key)")
    export.add_argument("--force", action="store_true", help="replace FILE and its statement if they exist")
    export.set_defaults(func=cmd_model_export)


def statement(report: dict[str, Any], summary: dict[str, Any] | None, out: Path, digest: str,
              card: dict[str, Any]) -> dict[str, Any]:
    """The privacy statement written beside an exported model: the audit's figures, not the run's
    own claims, and (``card``) the statement for a model card that fedpriv review also gives
    (common.review.privacy_statement)."""
    return {
        "fedpriv_model_export": 1,
        "notice": ("A plaintext copy of a fedpriv run's final model, exported on purpose. The file is not "
                   "encrypted: what protects the training data is the differential privacy stated here."),
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "file": out.name,
        "sha256": digest,
        "run": {"run_id": report["run_id"], "run_dir": report["run_dir"],
                "name": (summary or {}).get("name"), "model": (summary or {}).get("model"),
                "final_accuracy": (summary or {}).get("final_accuracy")},
        "privacy": {
            "delta": report["delta"],
            "accountant": report["enforcement_accountant"],
            "epsilon": report["epsilon"],
            "user_level_cumulative": report["user_level_cumulative"],
            "budgets": report["budgets"],
            "mechanisms": {level: (card[level] or {}).get("mechanism") for level in ("record_level", "user_level")},
        },
        "model_card": card,
        "audit": {"ok": report["ok"], "failures": report["failures"], "ledger_entries": report["entries"],
                  "key": report["key"]},
    }


def cmd_model_export(args: argparse.Namespace) -> int:
    import numpy as np

    from fedpriv.audit_cmd import _fmt
    from fedpriv.common import checkpoint, fileio, rundir
    from fedpriv.common.audit import audited_run
    from fedpriv.common.errors import FedprivError
    from fedpriv.common.review import facts_of, privacy_statement

    out: Path = args.out
    if out.suffix not in FORMATS:
        raise FedprivError(f"--out must end in {' or '.join(FORMATS)}: {out}")
    side = out.with_name(out.name + STATEMENT_SUFFIX)
    if not args.force and (out.exists() or side.exists()):
        raise FedprivError(f"{out if out.exists() else side} exists; pass --force to replace it")
    sealed = args.run_dir / rundir.MODEL
    if not sealed.is_file():
        raise FedprivError(f"no sealed model in {args.run_dir} ({rundir.MODEL}): the run did not finish, "
                           f"or ran without a sealing key")
    report, entries = audited_run(args.run_dir, public_key=args.public_key)
    if not report["ledger_ok"]:
        raise FedprivError(f"the run's ledger does not verify, so its model is not exported: {report['failures'][0]}")
    key = checkpoint.require_key("exporting the model needs the key it was sealed with")
    weights = checkpoint.read_model(sealed, key, report["run_id"])
    facts = facts_of(args.run_dir, report, entries)
    if out.suffix == ".npz":
        buffer = io.BytesIO()
        np.savez(buffer, *weights)
        data = buffer.getvalue()
    else:
        data = _keras_file(facts.state, weights)
    fileio.write_atomic(out, data)
    fileio.write_json(side, statement(report, facts.summary, out, hashlib.sha256(data).hexdigest(),
                                      privacy_statement(facts)))
    eps = report["epsilon"]
    record = max((v["rdp"] for v in eps["record_level"].values()), default=None)
    user = (eps["user_level"] or {}).get("rdp")
    print(f"exported the model of run {report['run_id']} to {out} (plaintext, on purpose)")
    print(f"privacy statement: {side} (record-level epsilon {_fmt(record)}, user-level epsilon "
          f"{_fmt(user)}, delta {report['delta']})")
    if not report["ok"]:
        print(f"warning: the run's audit failed ({len(report['failures'])} finding(s), first: "
              f"{report['failures'][0]}); the statement records them")
    return EXIT_OK


def _keras_file(state: Any, weights: list[Any]) -> bytes:
    """The whole Keras model, rebuilt from the configuration the run's verified ledger recorded
    (``state``: the replay of the entries the export's audit verified)."""
    import tempfile

    from fedpriv.common.config import RunConfig
    from fedpriv.common.models import configured_model
    from fedpriv.common.settings import recorded_config

    model = configured_model(RunConfig.from_flat(recorded_config(state)), weights)
    with tempfile.TemporaryDirectory() as scratch:  # Keras writes .keras files by name only
        path = Path(scratch) / "model.keras"
        model.save(path)
        return path.read_bytes()
