"""The human forms of a compliance review (``fedpriv review``): Markdown, a self-contained HTML page
(plots inline, a Content-Security-Policy that lets it load nothing), and the privacy statement for
a model card. Everything here is rendered from the report :func:`common.review.review` built."""

from __future__ import annotations

import base64
import html
import json
from typing import Any

from fedpriv.common.review import CONTROLS, FAIL, GROUPS, NOT_APPLICABLE, PASS

TO_FILL = "[to be filled in by the controller]"

# GDPR Article 35(7)(c)-(d): the risks to data subjects, and the measures in place against each,
# by the controls that evidence them.
DPIA_RISKS = (
    ("Membership inference or reconstruction of training records from the released model",
     "differential privacy at the protected unit, with a verified budget", ("P-1", "P-2", "P-3", "P-4", "P-5", "C-5")),
    ("The server learns an individual client's update",
     "SecAgg+ masking with enough shares and enough clients per round", ("T-2", "T-3", "T-4")),
    ("The server does not add the noise it should, or deviates from the protocol",
     "noise added on the nodes; every node holds its own privacy floor and ledger", ("T-1", "D-1")),
    ("Privacy records altered, re-signed or rolled back to hide spending",
     "signed hash-chained ledger, pinned key, witnesses, reviews that record ledger heads", ("C-1", "C-2", "C-3", "C-4")),
    ("An unauthorised node or operator takes part", "TLS, a CA-signed node roster, operators by role",
     ("S-1", "S-2", "S-3")),
    ("Theft of stored models, checkpoints or keys", "sealed files, owner-only modes, key and certificate age",
     ("S-4", "S-5", "S-6", "S-7")),
    ("Predictable noise, sampling or masks", "every secret draw from the OS CSPRNG", ("S-8",)),
    ("A report that reveals one client's statistics", "server-side figures only", ("D-2",)),
)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _run_name(report: dict[str, Any], run: str | None) -> str:
    """A control's run by its directory's name (the JSON keeps the run id)."""
    return next((r["name"] for r in report["runs"] if r["run_id"] == run), run or "")


def _status_of(report: dict[str, Any], ids: tuple[str, ...]) -> str:
    found = [c["status"] for c in report["controls"] if c["id"] in ids]
    if FAIL in found:
        return FAIL
    return PASS if PASS in found else NOT_APPLICABLE


def statement_lines(run: dict[str, Any]) -> list[str]:
    """The privacy statement of one run, for a model card (Markdown)."""
    s = run["statement"]
    lines = [f"### Privacy statement: {run['name']}", "",
             f"- Run id: `{s['run_id']}`; {s['rounds']} round(s); ended {s['run_ended'] or 'not recorded'}.",
             "- Unit of privacy: " + ("; ".join(f"{u['unit']} ({u['meaning']})" for u in s["units"]) or "none"),
             f"- Delta: {s['delta']}."]
    record, user = s["record_level"], s["user_level"]
    if record:
        lines.append(f"- Record-level epsilon: **{_fmt(record['epsilon_rdp'])}** (RDP, enforced) / "
                     f"{_fmt(record['epsilon_pld'])} (PLD), {record['of']} ({record['clients']} clients). "
                     f"Mechanism: {record['mechanism']}; noise multiplier {record['noise_multiplier']}, clipping "
                     f"norm {record['l2_norm_clip']}; {record['sampling']}.")
    if user:
        composed = (f"; composed with the server's earlier runs {_fmt(user['epsilon_rdp_composed'])}"
                    if user["epsilon_rdp_composed"] is not None else "")
        lines.append(f"- User-level epsilon: **{_fmt(user['epsilon_rdp'])}** (RDP) / {_fmt(user['epsilon_pld'])} "
                     f"(PLD){composed}. Mechanism: {user['mechanism']}; noise multiplier {user['noise_multiplier']}, "
                     f"clipping norm {user['clipping_norm']}; {user['sampling']}.")
    lines.append(f"- Trust model: {s['trust_model']}.")
    if s["empirical"]:
        e = s["empirical"]
        lines.append(f"- Empirical lower bound on epsilon: {_fmt(e['epsilon_lower_bound'])} at "
                     f"{_fmt(e['confidence'], 2)} confidence ({e['verdict']}).")
    else:
        lines.append("- Empirical lower bound: not measured (fedpriv audit --empirical).")
    lines.append(f"- Accountants: {s['accountants']['rdp']}; {s['accountants']['pld']}. Every figure recomputed "
                 f"from the run's {s['ledger_entries']} signed ledger entries ({'audit passed' if s['audit_ok'] else 'AUDIT FAILED'}).")
    return lines


def statement_markdown(report: dict[str, Any]) -> str:
    lines = ["# Privacy statement", "", f"From the compliance review of {report['reviewed_at']}.", ""]
    for run in report["runs"]:
        lines += statement_lines(run) + [""]
    return "\n".join(lines)


def _article30(report: dict[str, Any]) -> list[tuple[str, str]]:
    configs = [r["statement"] for r in report["runs"]]
    units = sorted({u["unit"] for s in configs for u in s["units"]})
    measures = ", ".join(f"{c['id']} {c['status']}" for c in _unique_controls(report))
    return [
        ("Name and contact details of the controller (and its representative, DPO)", TO_FILL),
        ("Purposes of the processing", TO_FILL),
        ("Categories of data subjects", TO_FILL),
        ("Categories of personal data", f"the training records each node holds (as configured per run); they never "
                                        f"leave the node. Protected unit(s) of privacy: {', '.join(units) or 'none'}"),
        ("Categories of recipients", "the aggregation server sees only SecAgg+-masked sums of DP-noised updates; "
                                     "whoever receives the final model sees a model released under the stated "
                                     "epsilon and delta"),
        ("Transfers to a third country or international organisation", TO_FILL),
        ("Time limits for erasure", TO_FILL + " (runs, ledgers and sealed models stay in the run directories "
                                              "until removed)"),
        ("Technical and organisational security measures (Art. 32)", measures),
    ]


def _unique_controls(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per control id: failed if any run failed it."""
    out: dict[str, dict[str, Any]] = {}
    for c in report["controls"]:
        seen = out.get(c["id"])
        if seen is None or c["status"] == FAIL or (seen["status"] == NOT_APPLICABLE and c["status"] == PASS):
            out[c["id"]] = c
    return [out[i] for i in CONTROLS if i in out]


def markdown(report: dict[str, Any]) -> str:
    verdict = report["verdict"].upper()
    lines = [f"# Compliance review: {verdict}", "",
             f"- Reviewed: {report['target']['kind']} `{report['target']['path']}` at {report['reviewed_at']}",
             f"- Policy: {report['policy']['source']}",
             f"- Signed by key {report.get('signature', {}).get('key_id', '(unsigned)')} (verify: "
             f"`fedpriv review --verify review.json --public-key KEY.pub`)"]
    if report["failed_controls"]:
        lines.append(f"- Failed controls: {', '.join(report['failed_controls'])}")
    lines.append("")
    for group, title in GROUPS.items():
        rows = [c for c in report["controls"] if c["group"] == group]
        if not rows:
            continue
        lines += [f"## {title}", "", "| control | run | question | status | finding |", "|---|---|---|---|---|"]
        for c in rows:
            status = f"**{c['status'].upper()}**" if c["status"] == FAIL else c["status"]
            lines.append(f"| {c['id']} | {_run_name(report, c['run'])} | {c['question']} | {status} | "
                         f"{c['reason'].replace('|', '/')} |")
        lines.append("")
    lines += ["## Runs", "", "| run | run id | record-level epsilon (RDP / PLD) | user-level epsilon | delta | audit |",
              "|---|---|---:|---:|---:|---|"]
    for run in report["runs"]:
        s = run["statement"]
        rec, usr = s["record_level"] or {}, s["user_level"] or {}
        lines.append(f"| {run['name']} | `{run['run_id']}` | {_fmt(rec.get('epsilon_rdp'))} / "
                     f"{_fmt(rec.get('epsilon_pld'))} | {_fmt(usr.get('epsilon_rdp'))} | {s['delta']} | "
                     f"{'pass' if run['audit_ok'] else 'FAIL'} |")
    lines.append("")
    for run in report["runs"]:
        lines += statement_lines(run) + [""]
    if report["since"] is not None:
        lines += _since_lines(report["since"])
    lines += ["## Record of processing (GDPR Article 30)", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _article30(report)]
    lines += ["", "## DPIA annex (GDPR Article 35): risks and measures", "",
              "| risk | measures in place | controls | status |", "|---|---|---|---|"]
    for risk, measures, ids in DPIA_RISKS:
        lines.append(f"| {risk} | {measures} | {', '.join(ids)} | {_status_of(report, ids)} |")
    lines += ["", "Likelihood and severity of each risk, and the residual risk, are the controller's assessment.", ""]
    return "\n".join(lines)


def _since_lines(since: dict[str, Any]) -> list[str]:
    lines = [f"## Changes since the review of {since['earlier_review']}", ""]
    lines.append(f"- New runs: {', '.join(map(str, since['new_runs'])) or 'none'}")
    lines.append(f"- Runs gone: {', '.join(map(str, since['removed_runs'])) or 'none'}")
    for run_id, levels in since["epsilon_spent_since"].items():
        for level, v in levels.items():
            lines.append(f"- Run `{run_id}`, {level.replace('_', '-')}: epsilon {_fmt(v['before'])} -> "
                         f"{_fmt(v['now'])} (+{_fmt(v['spent_since'])})")
    for c in since["controls_changed"]:
        lines.append(f"- {c['id']}{' (' + c['run'] + ')' if c['run'] else ''}: {c['before']} -> {c['now']}")
    if not since["epsilon_spent_since"] and not since["controls_changed"]:
        lines.append("- No epsilon spent and no control changed state.")
    return lines + [""]


# ---- HTML -------------------------------------------------------------------------------------------
STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:72rem;color:#1d2430;
line-height:1.4;padding:0 1rem}
h1{margin-bottom:.2rem}.verdict{display:inline-block;padding:.3rem 1rem;border-radius:.4rem;font-weight:700;
font-size:1.6rem;color:#fff}.pass{background:#23803a}.fail{background:#b3261e}
table{border-collapse:collapse;width:100%;margin:.6rem 0 1.2rem}th,td{border:1px solid #d4d9e1;padding:.35rem .5rem;
text-align:left;vertical-align:top;font-size:.92rem}th{background:#f1f4f8}
td.status-pass{color:#23803a;font-weight:600}td.status-fail{color:#b3261e;font-weight:700}
td.status-na{color:#6b7280}details pre{white-space:pre-wrap;font-size:.8rem;background:#f7f8fa;padding:.5rem;
margin:.3rem 0}.meta{color:#4b5563}.eps{font-size:1.3rem;font-weight:700}img{max-width:100%}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _status_cell(status: str) -> str:
    cls = {PASS: "status-pass", FAIL: "status-fail"}.get(status, "status-na")
    return f'<td class="{cls}">{_e(status.upper() if status == FAIL else status)}</td>'


def page(report: dict[str, Any], plots: dict[str, bytes]) -> str:
    """A self-contained HTML page: no script, no external resource (its CSP forbids loading any)."""
    verdict = report["verdict"]
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">",
        f"<title>fedpriv compliance review: {_e(verdict.upper())}</title><style>{STYLE}</style></head><body>",
        f"<h1>Compliance review</h1><p><span id=\"verdict\" class=\"verdict {_e(verdict)}\">"
        f"Verdict: {_e(verdict.upper())}</span></p>",
        f"<p class=\"meta\">{_e(report['target']['kind'])} <code>{_e(report['target']['path'])}</code>, reviewed "
        f"{_e(report['reviewed_at'])}; policy: {_e(report['policy']['source'])}; signed by key "
        f"{_e(report.get('signature', {}).get('key_id', '(unsigned)'))}.</p>",
    ]
    if report["failed_controls"]:
        parts.append(f"<p><strong>Failed controls:</strong> {_e(', '.join(report['failed_controls']))}</p>")
    parts.append("<h2>Runs</h2><table><tr><th>run</th><th>record-level epsilon (RDP / PLD)</th>"
                 "<th>user-level epsilon</th><th>delta</th><th>audit</th></tr>")
    for run in report["runs"]:
        s = run["statement"]
        rec, usr = s["record_level"] or {}, s["user_level"] or {}
        parts.append(f"<tr><td>{_e(run['name'])}<br><code>{_e(run['run_id'])}</code></td>"
                     f"<td><span class=\"eps\">epsilon = {_e(_fmt(rec.get('epsilon_rdp')))}</span> / "
                     f"{_e(_fmt(rec.get('epsilon_pld')))}</td><td>{_e(_fmt(usr.get('epsilon_rdp')))}</td>"
                     f"<td>{_e(s['delta'])}</td>{_status_cell(PASS if run['audit_ok'] else FAIL)}</tr>")
    parts.append("</table>")
    for run in report["runs"]:
        png = plots.get(run["name"])
        if png:
            parts.append(f"<figure><img alt=\"epsilon per round, {_e(run['name'])}\" "
                         f"src=\"data:image/png;base64,{base64.b64encode(png).decode()}\">"
                         f"<figcaption>Epsilon per round of {_e(run['name'])}, recomputed from its ledger."
                         "</figcaption></figure>")
    for group, title in GROUPS.items():
        rows = [c for c in report["controls"] if c["group"] == group]
        if not rows:
            continue
        parts.append(f"<h2>{_e(title)}</h2><table><tr><th>control</th><th>run</th><th>question</th><th>status</th>"
                     "<th>finding and evidence</th></tr>")
        for c in rows:
            evidence = json.dumps(c["evidence"], indent=1, sort_keys=True, default=str)
            parts.append(f"<tr><td>{_e(c['id'])}</td><td>{_e(_run_name(report, c['run']))}</td><td>{_e(c['question'])}</td>"
                         f"{_status_cell(c['status'])}<td>{_e(c['reason'])}<details><summary>evidence</summary>"
                         f"<pre>{_e(evidence)}</pre></details></td></tr>")
        parts.append("</table>")
    parts.append("<h2>Privacy statement</h2>")
    for run in report["runs"]:
        parts.append("<ul>" + "".join(f"<li>{_e(line[2:])}</li>" for line in statement_lines(run)[2:]) + "</ul>")
    if report["since"] is not None:
        parts.append("<h2>Changes since the earlier review</h2><ul>" + "".join(
            f"<li>{_e(line[2:])}</li>" for line in _since_lines(report["since"])[2:] if line) + "</ul>")
    parts.append("<h2>Record of processing (GDPR Article 30)</h2><table>")
    parts += [f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in _article30(report)]
    parts.append("</table><h2>DPIA annex (GDPR Article 35)</h2><table><tr><th>risk</th><th>measures in place</th>"
                 "<th>controls</th><th>status</th></tr>")
    for risk, measures, ids in DPIA_RISKS:
        parts.append(f"<tr><td>{_e(risk)}</td><td>{_e(measures)}</td><td>{_e(', '.join(ids))}</td>"
                     f"{_status_cell(_status_of(report, ids))}</tr>")
    parts.append("</table><p class=\"meta\">Likelihood, severity and residual risk are the controller's "
                 "assessment.</p></body></html>")
    return "\n".join(parts)
