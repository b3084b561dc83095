"""``fedpriv audit RUN_DIR``: verify a run's privacy ledger and recompute its epsilon."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

from common.audit import AUDIT_MD, AUDIT_PNG, audit_run
from common.rundir import json_safe, write_atomic

EXIT_FAILED = 1


def add_parser(sub: Any) -> None:
    audit = sub.add_parser(
        "audit", help="verify a run's privacy ledger and budgets",
        description=(
            "Verify the hash chain and every Ed25519 signature of RUN_DIR/ledger.jsonl, replay "
            "its DpEvents through fresh RDP and PLD accountants, compare with the recorded "
            "epsilon and summary.json, and check the budgets. Writes audit.md and audit.png into "
            "RUN_DIR. Exit status 0 when everything holds, 1 when anything fails (each failure "
            "is named), 2 for bad input."
        ),
    )
    audit.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    audit.add_argument("--budget", type=float, metavar="EPS",
                       help="also require every recomputed epsilon (each client's, and the user-level) to be <= EPS")
    audit.add_argument("--public-key", type=Path, metavar="FILE",
                       help="trusted ledger public key (PEM); default: RUN_DIR/ledger.pub")
    audit.add_argument("--json", action="store_true", help="print the report as JSON")
    audit.set_defaults(func=cmd_audit)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}"


def markdown(report: dict[str, Any]) -> str:
    eps = report["epsilon"]
    lines = [
        f"# Privacy audit of `{Path(report['run_dir']).name}`",
        "",
        f"**Verdict: {'PASS' if report['ok'] else 'FAIL'}** -- ledger "
        f"{'verified' if report['ledger_ok'] else 'NOT verified'} ({report['entries']} entries), "
        f"recorded figures {'reproduced' if report['consistent'] else 'NOT reproduced'}, "
        f"budgets {'held' if report['budget_ok'] else 'EXCEEDED'}.",
        "",
        f"delta = {report['delta']}; enforcement accountant: {report['enforcement_accountant'].upper()}.",
        "",
        "| scope | epsilon (RDP) | epsilon (PLD) | budget |",
        "|---|---:|---:|---:|",
    ]
    budgets = report["budgets"]
    if eps["user_level"] is not None:
        lines.append(f"| user level | {_fmt(eps['user_level']['rdp'])} | {_fmt(eps['user_level']['pld'])} | "
                     f"{budgets['user_level'] or '-'} |")
    for cid, figures in eps["record_level"].items():
        lines.append(f"| client {cid}, record level | {_fmt(figures['rdp'])} | {_fmt(figures['pld'])} | "
                     f"{budgets['record_level'] or '-'} |")
    lines += ["", f"Refusals recorded: {report['refusals']}."]
    if report["stopped_early"]:
        lines.append(f"Stopped early: {report['stopped_early']['reason']}.")
    if report["failures"]:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in report["failures"]]
    lines += ["", f"![epsilon per round]({AUDIT_PNG})", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key, label, style in (("record_level_max", "record level (max over clients)", "s--"),
                              ("user_level", "user level", "^-")):
        series = report["series"][key]
        if series:
            rounds = sorted(series)
            ax.plot(rounds, [series[r] for r in rounds], style, label=label)
    for key, label in (("record_level", "record-level budget"), ("user_level", "user-level budget")):
        if report["budgets"][key]:
            ax.axhline(report["budgets"][key], linestyle=":", color="gray")
            ax.annotate(label, (0.01, report["budgets"][key]), xycoords=("axes fraction", "data"),
                        fontsize=8, color="gray", va="bottom")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(f"epsilon (RDP, delta={report['delta']})")
    ax.set_ylim(bottom=0)
    ax.set_title("Recomputed from the ledger: " + ("PASS" if report["ok"] else "FAIL"))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def cmd_audit(args: argparse.Namespace) -> int:
    report = audit_run(args.run_dir, args.budget, args.public_key)
    write_atomic(args.run_dir / AUDIT_MD, markdown(report).encode())
    plot(report, args.run_dir / AUDIT_PNG)
    if args.json:
        print(json.dumps(json_safe(report), indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        console = Console()
        table = Table(title=f"privacy audit: {args.run_dir}")
        for column in ("scope", "epsilon (RDP)", "epsilon (PLD)", "budget"):
            table.add_column(column, justify="right" if column != "scope" else "left")
        eps, budgets = report["epsilon"], report["budgets"]
        if eps["user_level"] is not None:
            table.add_row("user level", _fmt(eps["user_level"]["rdp"]), _fmt(eps["user_level"]["pld"]),
                          str(budgets["user_level"] or "-"))
        for cid, figures in eps["record_level"].items():
            table.add_row(f"client {cid}", _fmt(figures["rdp"]), _fmt(figures["pld"]),
                          str(budgets["record_level"] or "-"))
        console.print(table)
        console.print(f"ledger: {'verified' if report['ledger_ok'] else 'NOT VERIFIED'} "
                      f"({report['entries']} entries); recorded figures "
                      f"{'reproduced' if report['consistent'] else 'NOT REPRODUCED'}; budgets "
                      f"{'held' if report['budget_ok'] else 'EXCEEDED'}", highlight=False)
        for failure in report["failures"]:
            console.print(f"[red]FAIL[/] {failure}", highlight=False)
        console.print(f"{'PASS' if report['ok'] else 'FAIL'}; wrote {args.run_dir / AUDIT_MD}", highlight=False)
    return 0 if report["ok"] else EXIT_FAILED
