"""``fedpriv review TARGET``: a compliance review of a run, a server's state or a node's state against
a policy, control by control (:mod:`common.review`); a signed JSON report, Markdown, a
self-contained HTML page and a privacy statement. ``fedpriv review --verify REPORT`` checks a
report's signature."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXIT_PASS, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
REPORT_JSON, REPORT_MD, REPORT_HTML, STATEMENT_MD = "review.json", "review.md", "review.html", "privacy-statement.md"


def add_parser(sub: Any) -> None:
    from fedpriv.common.review import DEFAULT_POLICY, REVIEWS_DIR

    review = sub.add_parser(
        "review", help="check a deployment and its runs against a compliance policy; a signed report",
        description=(
            "Review TARGET against a policy, control by control, grouped as NIST SP 800-226 groups an "
            "evaluation of differential privacy (unit of privacy, privacy parameters, trust model, "
            "correctness, security of the deployment, data exposure). TARGET is a run directory, a "
            "server's state directory (fedpriv server start --state: every run in it, with the "
            "deployment's TLS, node and operator authentication, keys and certificates) or a node's "
            "state directory. Every figure is recomputed: epsilon by fedpriv audit (the ledger "
            "verified and replayed), configuration from the signed ledger, file modes, seals and "
            "certificate dates from the files. Writes a signed review.json (Ed25519, the federation's "
            "ledger-signing key), review.md, a self-contained review.html and privacy-statement.md "
            f"into --out (default TARGET/{REVIEWS_DIR}/<UTC time>). Exit status 0 when every control "
            "passes (or does not apply), 1 when one fails, 2 for bad input: it runs from cron or CI."
        ),
    )
    review.add_argument("target", metavar="TARGET", type=Path, nargs="?",
                        help="a run directory, a server state directory or a node state directory")
    review.add_argument("--policy", type=Path, metavar="FILE",
                        help=f"the policy (TOML); default: the shipped default policy ({DEFAULT_POLICY.name}, "
                             "printed by --show-policy)")
    review.add_argument("--show-policy", action="store_true", help="print the default policy and exit")
    review.add_argument("--out", type=Path, metavar="DIR", help="where to write the report files")
    review.add_argument("--since", type=Path, metavar="REPORT",
                        help="an earlier review.json: say what changed since (new runs, epsilon spent, controls "
                             "that changed state) and fail C-4 for a ledger rolled back below what it saw")
    review.add_argument("--keys", type=Path, metavar="DIR",
                        help="the deployment's key directory, for its certificates and keys (default: STATE/keys)")
    review.add_argument("--public-key", type=Path, metavar="FILE",
                        help="the trusted ledger public key for the audits (as fedpriv audit --public-key); with "
                             "--verify, the key the report must be signed with")
    review.add_argument("--signing-key", metavar="FILE",
                        help="the Ed25519 key that signs the report (a file or a PKCS#11 URI; default: the "
                             "federation's ledger-signing key: KEYS/ledger-signing.key, else $FEDPRIV_LEDGER_KEY "
                             "or $FEDPRIV_HOME/keys/ledger-signing.key; a node's node.key for a node state)")
    review.add_argument("--verify", type=Path, metavar="REPORT",
                        help="verify the signature of a review.json with --public-key, and print its verdict")
    review.add_argument("--json", action="store_true", help="print the report as JSON")
    review.set_defaults(func=cmd_review)


def cmd_review(args: argparse.Namespace) -> int:
    from fedpriv.common.errors import FedprivError
    from fedpriv.common.review import DEFAULT_POLICY

    if args.show_policy:
        print(DEFAULT_POLICY.read_text(), end="")
        return EXIT_PASS
    if args.verify is not None:
        return _verify(args)
    if args.target is None:
        raise FedprivError("give TARGET (a run directory, a server state or a node state), or --verify REPORT")
    return _review(args)


def _public_key(path: Path | None) -> Any:
    from fedpriv.common.errors import FedprivError
    from fedpriv.common.ledger import load_public_key

    if path is None:
        raise FedprivError("--verify needs --public-key FILE: the key the report must be signed with")
    return load_public_key(path)


def _verify(args: argparse.Namespace) -> int:
    from fedpriv.common.errors import FedprivError
    from fedpriv.common.review import verify_report
    from fedpriv.common.tls import read_file

    key = _public_key(args.public_key)
    data = read_file(args.verify, "report")
    try:
        report = verify_report(data, key, str(args.verify))
    except FedprivError as exc:
        print(f"FAILED: {exc}")
        return EXIT_FAILED
    print(f"verified: review of {report['target']['kind']} {report['target']['path']} at {report['reviewed_at']}, "
          f"signed by key {report['signature']['key_id']}; verdict {report['verdict'].upper()}"
          + (f" (failed: {', '.join(report['failed_controls'])})" if report["failed_controls"] else ""))
    return EXIT_PASS


def _signing_key(args: argparse.Namespace, target: Any) -> Any:
    from fedpriv.common import key_providers
    from fedpriv.common.errors import FedprivError
    from fedpriv.common.ledger import load_or_create_signing_key
    from fedpriv.common.review import signing_key_path

    path = Path(args.signing_key) if args.signing_key else signing_key_path(target)
    if not key_providers.is_pkcs11(path) and not path.is_file():
        raise FedprivError(f"no signing key at {path} (give --signing-key FILE: the federation's ledger-signing key)")
    return load_or_create_signing_key(path)


def _review(args: argparse.Namespace) -> int:
    import datetime as _dt
    import json

    from fedpriv.audit_cmd import plot_png
    from fedpriv.common import fileio
    from fedpriv.common.errors import FedprivError
    from fedpriv.common.review import (
        FAIL, default_out, find_target, load_policy, review, sign_report, verify_report,
    )
    from fedpriv.common.tls import read_file
    from fedpriv.review_render import markdown, page, statement_markdown

    policy, source = load_policy(args.policy)
    target = find_target(args.target, args.keys)
    key = _signing_key(args, target)
    since = None
    if args.since is not None:
        try:
            since = verify_report(read_file(args.since, "earlier review"), key.public_key(), str(args.since))
        except FedprivError as exc:
            raise FedprivError(f"--since: {exc}") from None
    now = _dt.datetime.now(_dt.timezone.utc)
    out = args.out or default_out(target, now)
    if out.exists() and any(out.iterdir()):
        raise FedprivError(f"{out} exists and is not empty; give another --out")
    many = len(target.runs) > 1
    report = review(target, policy, source, public_key=args.public_key, since=since, now=now,
                    progress=(lambda m: print(m, file=sys.stderr)) if many else None)
    signed = sign_report(report, key)
    report["signature"] = json.loads(signed)["signature"]  # (the pages name the key that signed)
    plots = {run["name"]: plot_png({"series": run["series"], "budgets": run["budgets"],
                                    "delta": run["statement"]["delta"], "ok": run["audit_ok"]})
             for run in report["runs"]}
    fileio.write_atomic(out / REPORT_JSON, signed)
    fileio.write_atomic(out / REPORT_MD, markdown(report).encode())
    fileio.write_atomic(out / REPORT_HTML, page(report, plots).encode())
    fileio.write_atomic(out / STATEMENT_MD, statement_markdown(report).encode())
    if args.json:
        print(signed.decode(), end="")
    else:
        _print(report, out)
    return EXIT_FAILED if report["verdict"] == FAIL else EXIT_PASS


def _print(report: dict[str, Any], out: Path) -> None:
    from fedpriv.common.review import FAIL, NOT_APPLICABLE, PASS

    counts = {s: sum(1 for c in report["controls"] if c["status"] == s) for s in (PASS, FAIL, NOT_APPLICABLE)}
    print(f"compliance review of {report['target']['kind']} {report['target']['path']}: "
          f"{report['verdict'].upper()} ({counts[PASS]} passed, {counts[FAIL]} failed, "
          f"{counts[NOT_APPLICABLE]} not applicable; policy {report['policy']['source']})")
    for c in report["controls"]:
        if c["status"] == FAIL:
            print(f"  FAIL {c['id']}{' [' + str(c['run']) + ']' if c['run'] else ''}: {c['reason']}")
    for run in report["runs"]:
        s = run["statement"]
        rec, usr = s["record_level"] or {}, s["user_level"] or {}
        eps = [f"record-level epsilon {rec['epsilon_rdp']:.4f}" if rec.get("epsilon_rdp") is not None else None,
               f"user-level epsilon {usr['epsilon_rdp']:.4f}" if usr.get("epsilon_rdp") is not None else None]
        print(f"  run {run['name']}: {', '.join(e for e in eps if e) or 'no DP'} at delta {s['delta']}")
    since = report["since"]
    if since is not None:
        print(f"  since {since['earlier_review']}: {len(since['new_runs'])} new run(s), "
              f"{len(since['controls_changed'])} control(s) changed state")
    print(f"report: {out / REPORT_JSON} (signed by key {report['signature']['key_id']}), {out / REPORT_HTML}, "
          f"{out / REPORT_MD}, {out / STATEMENT_MD}")
