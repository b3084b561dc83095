"""``fedpriv audit RUN_DIR``: verify a run's privacy ledger and recompute its epsilon; with
``--empirical``, also measure a lower bound on epsilon (see :mod:`simulations.empirical_audit`)."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

from fedpriv.common.audit import AUDIT_EMPIRICAL, AUDIT_MD, AUDIT_PNG, audit_run
from fedpriv.common.canaries import DEFAULT_COUNT as DEFAULT_CANARIES
from fedpriv.common.canaries import GRADIENT_DEFAULT_COUNT
from fedpriv.common.empirical import DEFAULT_CONFIDENCE
from fedpriv.common.errors import FedprivError
from fedpriv.common.fileio import json_safe, write_atomic, write_json

EXIT_FAILED = 1
EMPIRICAL_OPTIONS = ("canaries", "confidence", "rounds", "seed", "work_dir", "white_box")


def add_parser(sub: Any) -> None:
    audit = sub.add_parser(
        "audit", help="verify a run's privacy ledger and budgets",
        description=(
            "Verify the hash chain and every Ed25519 signature of RUN_DIR/ledger.jsonl, replay "
            "its DpEvents through fresh RDP and PLD accountants, compare with the recorded "
            "epsilon and summary.json, and check the budgets. Writes audit.md and audit.png into "
            "RUN_DIR. With --empirical, also train the run's configuration once more with canaries "
            "and measure a lower bound on epsilon (Steinke, Nasr and Jagielski 2023) and a "
            "membership-inference attack, beside the accounted upper bound (also written to "
            f"RUN_DIR/{AUDIT_EMPIRICAL}). Exit status 0 when everything holds, 1 when anything "
            "fails (each failure is named, a VIOLATION included), 2 for bad input."
        ),
    )
    audit.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    audit.add_argument("--budget", type=float, metavar="EPS",
                       help="also require every recomputed epsilon (each client's, and the user-level) to be <= EPS")
    audit.add_argument("--public-key", type=Path, metavar="FILE",
                       help="trusted ledger public key (PEM); default: the key the server's state "
                            "recorded for this run (STATE/ledger-witness beside STATE/runs, else "
                            "$FEDPRIV_HOME/ledger-witness), and only without one RUN_DIR/ledger.pub, "
                            "which the audit then says it trusted")
    audit.add_argument("--node-ledger", type=Path, metavar="DIR", action="extend", nargs="+", default=[],
                       help="nodes' state directories (or their ledger.jsonl) to cross-check with the run's "
                            "ledger: each node's spends in this run and the run heads it was sent "
                            "(repeatable; simulated nodes under RUN_DIR/nodes are always checked)")
    audit.add_argument("--operator-log", type=Path, metavar="DIR",
                       help="the server's operator log, to say who submitted the run (default: "
                            "STATE/operator-log when the run directory is STATE/runs/RUN)")
    audit.add_argument("--json", action="store_true", help="print the report as JSON")
    empirical = audit.add_argument_group("empirical audit")
    empirical.add_argument(
        "--empirical", action="store_true",
        help="train the run's configuration once more with canaries (about the run's own wall time) and "
             "report a measured lower bound on epsilon beside the accounted one",
    )
    empirical.add_argument("--white-box", action="store_true", default=None,
                           help="gradient canaries: observe every DP-SGD step's released gradient, as an "
                                "adversary who sees all of a client's updates would (needs DP-SGD with "
                                "book-keeping clipping); default: black-box record canaries scored by the "
                                "final model's loss")
    empirical.add_argument("--canaries", type=int, metavar="M",
                           help=f"canaries, each included with probability 1/2 (default {DEFAULT_CANARIES}, "
                                f"{GRADIENT_DEFAULT_COUNT:,} with --white-box)")
    empirical.add_argument("--confidence", type=float, metavar="C",
                           help=f"confidence of the lower bound (default {DEFAULT_CONFIDENCE})")
    empirical.add_argument("--rounds", type=int, metavar="N",
                           help="train N rounds instead of the run's own (faster; the canary run's "
                                "own accounting is what the bound is compared with)")
    empirical.add_argument("--seed", type=int, metavar="S",
                           help="seed of the canaries and their inclusion (default: from the OS; reported)")
    empirical.add_argument("--work-dir", type=Path, metavar="DIR",
                           help="keep the canary run in DIR (default: a temporary directory, removed)")
    empirical.add_argument("--verbose", action="store_true", help="show Flower, Ray and TensorFlow logs")
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
        key_line(report),
        "",
        "| scope | epsilon (RDP) | epsilon (PLD) | budget |",
        "|---|---:|---:|---:|",
    ]
    budgets = report["budgets"]
    if eps["user_level"] is not None:
        lines.append(f"| user level | {_fmt(eps['user_level']['rdp'])} | {_fmt(eps['user_level']['pld'])} | "
                     f"{budgets['user_level'] or '-'} |")
    cumulative = report.get("user_level_cumulative")
    if cumulative is not None and report.get("composed_runs"):
        lines.append(f"| user level, with the {len(report['composed_runs'])} earlier run(s) of this server state | "
                     f"{_fmt(cumulative.get('rdp'))} | {_fmt(cumulative.get('pld'))} | {budgets['user_level'] or '-'} |")
    for cid, figures in eps["record_level"].items():
        lines.append(f"| client {cid}, record level | {_fmt(figures['rdp'])} | {_fmt(figures['pld'])} | "
                     f"{budgets['record_level'] or '-'} |")
    lines += ["", f"Refusals recorded: {report['refusals']}."]
    for node in report.get("node_ledgers") or []:
        lines.append(f"Node ledger {node['node_ledger']}: {node['spends']} spend(s) in this run"
                     + (f", client {node['client_id']}" if node["client_id"] else "")
                     + (f", key {node['key']} (its own ledger.pub)" if node["key"] else "") + ".")
    lines += [f"Note: {note}." for note in report.get("notes") or []]
    for who in report.get("submitted_by") or []:
        lines.append(f"Submitted by {who['operator']} ({who['role'] or 'unknown role'}), Flower run "
                     f"{who['flower_run_id']} (operator log).")
    for rotation in report.get("key_rotations") or []:
        lines.append(f"Sealing key rotated (ledger entry {rotation['ledger_entry']}): {rotation['old_key']} -> "
                     f"{rotation['new_key']}, files sealed again: {', '.join(rotation['files'] or []) or 'none'}.")
    if report["stopped_early"]:
        lines.append(f"Stopped early: {report['stopped_early']['reason']}.")
    if report.get("empirical"):
        lines += ["", *empirical_markdown(report["empirical"])]
    if report["failures"]:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in report["failures"]]
    lines += ["", f"![epsilon per round]({AUDIT_PNG})", ""]
    return "\n".join(lines)


def key_line(report: dict[str, Any]) -> str:
    """Which key the ledger was verified with, and whether it was pinned."""
    key = report["key"]
    if key["pinned"]:
        return f"Ledger key {key['fingerprint']}, pinned from {key['source']}."
    return (f"WARNING: ledger key {key['fingerprint']} was NOT pinned: it was trusted from ledger.pub in the "
            f"run directory, so a ledger re-signed with another key would pass; pin it with --public-key.")


def empirical_markdown(result: dict[str, Any]) -> list[str]:
    """The report's "Empirical audit" section."""
    lines = ["## Empirical audit", ""]
    if result.get("skipped"):
        return lines + [f"Not run: {result['skipped']}."]
    accounted, run = result["accounted_epsilon"], result["accounted"]["run"]
    lines += [
        f"**{result['verdict']}**",
        "",
        "| | epsilon |",
        "|---|---:|",
        f"| accounted, upper bound (canary run, tightest of RDP/PLD, max over clients) | "
        f"{_fmt(accounted) if accounted is not None else 'none (no record-level DP)'} |",
        f"| accounted for this run (RDP / PLD, max over clients) | "
        f"{_fmt(run['rdp']) + ' / ' + _fmt(run['pld']) if run else 'none'} |",
        f"| **measured lower bound** at {result['confidence'] * 100:g}% confidence (Steinke et al.) | "
        f"**{_fmt(result['epsilon_lower_bound'])}** |",
        f"| **measured lower bound, Gaussian f-DP** (Mahloujifar et al.) | "
        f"**{_fmt(result.get('gdp_epsilon_lower_bound'))}** |",
        "",
        f"Mode: {result.get('mode', 'black-box')}. The accountant's whole trade-off curve "
        f"{'is REJECTED by' if result.get('claim_rejected') else 'is consistent with'} the guesses "
        f"(f-DP test at the same confidence).",
        "",
        f"One-run audit (Steinke, Nasr and Jagielski 2023) at delta = {result['delta']:g}: "
        f"{result['canaries']} canaries ({result['canaries_included']} included), "
        f"{result['guesses']} guesses ({result['guesses_in']} \"in\", {result['guesses_out']} \"out\"), "
        f"{result['correct']} correct; best of {result['guess_plans_tried']} guess counts fixed in "
        f"advance, Bonferroni-corrected. Canaries: {result['canary_design']}; seed {result['canary_seed']}. "
        f"Canary run: {result['num_clients']} clients, {result['rounds']} rounds, final accuracy "
        f"{_fmt(result['canary_run_final_accuracy'])}, {result['training_s']:.0f} s of training "
        f"({result['wall_time_s']:.0f} s in all).",
        "",
        "Loss-threshold membership inference on ordinary training examples against held-out ones:",
        "",
        "| model | AUC | TPR at FPR 0.1% | TPR at FPR 1% | members / non-members |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, label in (("run_model", "the run's model.npz"), ("canary_run_model", "the canary run's model")):
        attack = result["membership_inference"].get(name)
        if attack:
            tpr = attack["tpr_at_fpr"]
            lines.append(f"| {label} | {attack['auc']:.4f} | {tpr['0.001']:.4f} | {tpr['0.01']:.4f} | "
                         f"{attack['members']} / {attack['nonmembers']} |")
    user = result.get("user_level")
    if user:
        lines += [
            "",
            "Canary clients for the user-level claim (Andrew et al. 2024): "
            f"{user['canary_clients']} clients ({user['included']} included), {user['design']}, scored by the "
            "cosine of their direction with the model's change.",
            "",
            "| user level | epsilon |",
            "|---|---:|",
            f"| accounted (canary run, tightest of RDP/PLD) | {_fmt(user['accounted_epsilon'])} |",
            f"| estimate (Gaussian fit, not a bound) | {_fmt(user['estimate'])} |",
            f"| lower bound, Steinke et al. / Gaussian f-DP | {_fmt(user['epsilon_lower_bound'])} / "
            f"{_fmt(user['gdp_epsilon_lower_bound'])} |",
            "",
            f"The accountant's user-level trade-off curve {'is REJECTED' if user['claim_rejected'] else 'holds'}.",
        ]
    if result["notes"]:
        lines += [""] + [f"Note: {note}." for note in result["notes"]]
    return lines


def plot(report: dict[str, Any], path: Path) -> None:
    write_atomic(path, plot_png(report))


def plot_png(report: dict[str, Any]) -> bytes:
    """Epsilon per round as the audit recomputed it (``report``: the audit's series, budgets,
    delta and verdict), as PNG bytes."""
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
    return buffer.getvalue()


def _empirical(args: argparse.Namespace, report: dict[str, Any]) -> dict[str, Any]:
    """Run the empirical audit and fold its verdict into ``report``."""
    if not report["ledger_ok"]:
        return {"skipped": "the ledger does not verify, so the run's configuration cannot be trusted"}
    from fedpriv.simulations.empirical_audit import run_empirical_audit, verdict_line

    options = {k: getattr(args, k) for k in EMPIRICAL_OPTIONS if getattr(args, k) is not None}
    console = _stderr_console()

    def on_start() -> None:  # every option and the run's configuration checked: training starts
        if not args.json:
            console.print("empirical audit: training the run's configuration once more, with canaries...")

    def on_round(entry: Any) -> None:
        if not args.json:
            console.print(f"empirical audit: canary run round {entry.round}", highlight=False)

    result = run_empirical_audit(args.run_dir, report, public_key=args.public_key, verbose=args.verbose,
                                 on_round=on_round, on_start=on_start, **options)
    if not result["consistent"]:
        report["failures"].append(f"empirical audit: {verdict_line(result)}")
        report["ok"] = False
    return result


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def cmd_audit(args: argparse.Namespace) -> int:
    given = [f"--{k.replace('_', '-')}" for k in EMPIRICAL_OPTIONS if getattr(args, k) is not None]
    if given and not args.empirical:
        raise FedprivError(f"{', '.join(given)} only apply with --empirical")
    report = audit_run(args.run_dir, args.budget, args.public_key, args.operator_log, args.node_ledger)
    if args.empirical:
        report["empirical"] = _empirical(args, report)
        write_json(args.run_dir / AUDIT_EMPIRICAL, report["empirical"])
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
        cumulative = report.get("user_level_cumulative")
        if cumulative is not None and report.get("composed_runs"):
            table.add_row(f"user level, with {len(report['composed_runs'])} earlier run(s)", _fmt(cumulative.get("rdp")),
                          _fmt(cumulative.get("pld")), str(budgets["user_level"] or "-"))
        for cid, figures in eps["record_level"].items():
            table.add_row(f"client {cid}", _fmt(figures["rdp"]), _fmt(figures["pld"]),
                          str(budgets["record_level"] or "-"))
        console.print(table)
        console.print(f"ledger: {'verified' if report['ledger_ok'] else 'NOT VERIFIED'} "
                      f"({report['entries']} entries); recorded figures "
                      f"{'reproduced' if report['consistent'] else 'NOT REPRODUCED'}; budgets "
                      f"{'held' if report['budget_ok'] else 'EXCEEDED'}", highlight=False)
        style = "" if report["key"]["pinned"] else "[bold red]"
        console.print(f"{style}{key_line(report)}", highlight=False, soft_wrap=True)
        for node in report.get("node_ledgers") or []:
            console.print(f"node ledger {node['node_ledger']}: {node['spends']} spend(s) in this run"
                          + (f", client {node['client_id']}" if node["client_id"] else ""), highlight=False)
        for note in report.get("notes") or []:
            console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
        for who in report.get("submitted_by") or []:
            console.print(f"submitted by: {who['operator']} ({who['role'] or 'unknown role'}), Flower run "
                          f"{who['flower_run_id']}", highlight=False)
        for note in report.get("crash_recoveries", []):
            console.print(f"[yellow]crash recovery:[/] {note}", highlight=False, soft_wrap=True)
        for rotation in report.get("key_rotations") or []:
            console.print(f"sealing key rotated at ledger entry {rotation['ledger_entry']}: {rotation['old_key']} -> "
                          f"{rotation['new_key']}", highlight=False)
        if report.get("empirical"):
            _print_empirical(console, report["empirical"])
        for failure in report["failures"]:
            console.print(f"[red]FAIL[/] {failure}", highlight=False)
        console.print(f"{'PASS' if report['ok'] else 'FAIL'}; wrote {args.run_dir / AUDIT_MD}", highlight=False)
    return 0 if report["ok"] else EXIT_FAILED


def _print_empirical(console: Any, result: dict[str, Any]) -> None:
    if result.get("skipped"):
        console.print(f"empirical audit not run: {result['skipped']}", highlight=False)
        return
    from fedpriv.simulations.empirical_audit import verdict_line

    tpr = result["tpr_at_fpr"]
    console.print(
        f"empirical: {result['canaries']} canaries, {result['correct']} of {result['guesses']} guesses "
        f"correct -> epsilon >= {result['epsilon_lower_bound']:.3f} ({result['confidence'] * 100:g}% confidence); "
        f"membership inference AUC {result['auc']:.3f}, TPR {tpr['0.001']:.3f} at FPR 0.1%, "
        f"{tpr['0.01']:.3f} at FPR 1%", highlight=False, soft_wrap=True)
    user = result.get("user_level")
    if user:
        console.print(f"canary clients (user level): {user['canary_clients']} ({user['included']} in), "
                      f"estimate epsilon {user['estimate']:.3f}, one-run bounds {user['epsilon_lower_bound']:.3f} / "
                      f"{user['gdp_epsilon_lower_bound']:.3f} (f-DP) vs accounted user-level epsilon "
                      f"{_fmt(user['accounted_epsilon'])}", highlight=False, soft_wrap=True)
    style = "green" if result["consistent"] else "bold red"
    console.print(f"[{style}]{verdict_line(result)}[/]", highlight=False, soft_wrap=True)
    for note in result["notes"]:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
