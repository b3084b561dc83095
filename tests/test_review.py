"""``fedpriv review``: the quickstart run passes the default policy; each breach the policy names
fails its own control with exit status 1; the signed report verifies and no altered byte does;
the privacy statement's epsilon is the audit's; the HTML page renders in headless Chromium and
loads nothing from the network. (The review of a real deployment is in tests/test_tutorial.py.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fedpriv.common.errors import FedprivError
from fedpriv.common.ledger import load_public_key
from fedpriv.common.review import CONTROLS, FAIL, NOT_APPLICABLE, PASS, verify_report
from tests.conftest import reissue_expired, run_cli_here, simulate_run

# Keeps this module on one pytest-xdist worker, so that its module fixtures are built once
# (tests/conftest.py stops the run if the mark has no effect).
pytestmark = pytest.mark.xdist_group("test_review")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("review-home")
    return {**os.environ, "FEDPRIV_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, env):
    """The quickstart preset as it ships (10 clients, the CNN, DP-SGD, SecAgg+), one round."""
    out = tmp_path_factory.mktemp("quickstart") / "run"
    proc, summary = simulate_run(out, ["run.rounds=1"], env=env, here=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def first_review(quickstart, env, tmp_path_factory):
    out = tmp_path_factory.mktemp("reviews") / "first"
    proc = run_cli_here("review", str(quickstart), "--out", str(out), env=env)
    return proc, out


def _report(out: Path) -> dict:
    return json.loads((out / "review.json").read_text())


def _ledger_pub(env: dict[str, str]) -> Path:
    return Path(env["FEDPRIV_HOME"]) / "ledger-witness" / "ledger-signing.pub"


def _failed(report: dict) -> set[str]:
    return {c["id"] for c in report["controls"] if c["status"] == FAIL}


def test_the_quickstart_run_passes_the_default_policy(first_review, quickstart, env):
    proc, out = first_review
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASS" in proc.stdout.splitlines()[0]
    report = _report(out)
    assert report["verdict"] == PASS and report["failed_controls"] == []
    assert report["policy"]["source"] == "default"
    # every control answered, each with its question and group, and every one that can be judged
    # for a simulation passed
    assert {c["id"] for c in report["controls"]} == set(CONTROLS)
    statuses = {c["id"]: c["status"] for c in report["controls"]}
    assert all(statuses[c] == PASS for c in ("P-1", "P-2", "P-4", "P-5", "T-1", "T-2", "T-3", "T-4", "C-1", "C-2",
                                             "C-3", "S-4", "S-5", "S-6", "S-8", "D-1", "D-2")), statuses
    assert all(statuses[c] == NOT_APPLICABLE for c in ("S-1", "S-2", "S-3", "S-7", "C-4", "C-5", "P-3")), statuses
    t4 = next(c for c in report["controls"] if c["id"] == "T-4")
    assert set(t4["evidence"]["clients_per_round"].values()) == {10}  # counted from the signed spends
    assert {p.name for p in out.iterdir()} == {"review.json", "review.md", "review.html", "privacy-statement.md"}
    # The default output is beside the run, in its reviews/ (and the run still passes after it).
    again = run_cli_here("review", str(quickstart), env=env)
    assert again.returncode == 0, again.stdout[-2000:]
    assert len(list((quickstart / "reviews").iterdir())) == 1


def test_the_signed_report_verifies_and_no_altered_byte_does(first_review, env, tmp_path):
    _, out = first_review
    data = (out / "review.json").read_bytes()
    key = load_public_key(_ledger_pub(env))
    assert verify_report(data, key)["verdict"] == PASS
    ok = run_cli_here("review", "--verify", str(out / "review.json"), "--public-key", str(_ledger_pub(env)), env=env)
    assert ok.returncode == 0 and "verified" in ok.stdout and "PASS" in ok.stdout, ok.stdout + ok.stderr
    # Every byte of the file, changed: none verifies.
    for i in range(len(data)):
        altered = bytearray(data)
        altered[i] ^= 0x01 if altered[i] not in (0x0A,) else 0x20
        with pytest.raises(FedprivError, match="does not verify"):
            verify_report(bytes(altered), key)
    # A whole-value change the canonical form keeps (PASS -> FAIL written canonically) fails on
    # the signature itself; and the command says FAILED with exit status 1.
    report = json.loads(data)
    report["verdict"] = FAIL
    forged = tmp_path / "forged.json"
    from fedpriv.common.ledger import canonical

    forged.write_bytes(canonical(report) + b"\n")
    refused = run_cli_here("review", "--verify", str(forged), "--public-key", str(_ledger_pub(env)), env=env)
    assert refused.returncode == 1 and "signature does not match" in refused.stdout, refused.stdout
    # Another key (a node's) is not the federation's.
    other = Path(report["runs"][0]["run_dir"]) / "nodes" / "sim-0" / "ledger.pub"
    wrong = run_cli_here("review", "--verify", str(out / "review.json"), "--public-key", str(other), env=env)
    assert wrong.returncode == 1 and "names signing key" in wrong.stdout


def test_the_privacy_statement_gives_the_audits_epsilon(first_review, quickstart, env):
    _, out = first_review
    audit = run_cli_here("audit", str(quickstart), "--json", env=env)
    assert audit.returncode == 0, audit.stdout[-2000:]
    audited = json.loads(audit.stdout)
    worst = max(audited["epsilon"]["record_level"].values(), key=lambda f: f["rdp"])
    statement = _report(out)["runs"][0]["statement"]
    assert statement["record_level"]["epsilon_rdp"] == worst["rdp"]
    assert statement["record_level"]["epsilon_pld"] == worst["pld"]
    assert statement["delta"] == audited["delta"] and statement["user_level"] is None
    text = (out / "privacy-statement.md").read_text()
    assert f"**{worst['rdp']:.4f}** (RDP, enforced) / {worst['pld']:.4f} (PLD)" in text
    assert "Unit of privacy: record" in text and "Trust model:" in text and "Empirical lower bound" in text


def test_an_epsilon_threshold_below_the_runs_fails_p2(quickstart, env, tmp_path):
    eps = max(json.loads((quickstart / "summary.json").read_text())["privacy"]["record_level"]["clients"].values())
    policy = tmp_path / "strict.toml"
    policy.write_text(f"[privacy]\nmax_record_epsilon = {eps * 0.9}\n")
    proc = run_cli_here("review", str(quickstart), "--policy", str(policy), "--out", str(tmp_path / "r"), env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = _report(tmp_path / "r")
    assert report["verdict"] == FAIL and report["failed_controls"] == ["P-2"]
    assert "FAIL P-2" in proc.stdout and f"maximum {eps * 0.9:g}" in proc.stdout


@pytest.mark.parametrize("policy, control", [
    ("[privacy]\nmax_delta = 1e-6\n", "P-4"),  # a fixed delta below the run's 1e-5
    ("[privacy]\nunit = 'user'\n", "P-1"),  # the quickstart protects records, not users
    ("[federation]\nmin_clients_per_round = 11\n", "T-4"),  # it has 10
    ("[secure_aggregation]\nmin_shares = 6\n", "T-3"),  # it splits each secret into 5
    ("[release]\nempirical_audit_required = true\n", "C-5"),  # it has no fedpriv audit --empirical
    ("[at_rest]\nmax_key_age_days = 0\n", "S-6"),
])
def test_each_other_policy_threshold_fails_its_own_control(quickstart, env, tmp_path, policy, control):
    (tmp_path / "policy.toml").write_text(policy)
    proc = run_cli_here("review", str(quickstart), "--policy", str(tmp_path / "policy.toml"),
                        "--out", str(tmp_path / "r"), env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert _report(tmp_path / "r")["failed_controls"] == [control]


def test_a_run_without_secagg_fails_t2(env, tmp_path):
    out = tmp_path / "plain"
    proc, _ = simulate_run(out, ["data.dataset=digits", "model.name=mlp", "federation.num_clients=3",
                                 "federation.min_available_clients=3", "run.rounds=1"], preset="no-secagg",
                           env=env, here=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    review = run_cli_here("review", str(out), "--out", str(tmp_path / "r"), env=env)
    assert review.returncode == 1, review.stdout + review.stderr
    report = _report(tmp_path / "r")
    assert report["failed_controls"] == ["T-2"]
    t2 = next(c for c in report["controls"] if c["id"] == "T-2")
    assert t2["evidence"]["secure_aggregation.enabled"] == [False]  # from the signed run_start
    # A policy that does not require SecAgg+ accepts it.
    policy = tmp_path / "no-secagg.toml"
    policy.write_text("[secure_aggregation]\nrequired = false\n")
    assert run_cli_here("review", str(out), "--policy", str(policy), "--out", str(tmp_path / "r2"),
                        env=env).returncode == 0


def test_a_world_readable_ledger_fails_s5(quickstart, env, tmp_path):
    ledger = quickstart / "ledger.jsonl"
    mode = ledger.stat().st_mode & 0o777
    ledger.chmod(0o644)
    try:
        proc = run_cli_here("review", str(quickstart), "--out", str(tmp_path / "r"), env=env)
    finally:
        ledger.chmod(mode)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = _report(tmp_path / "r")
    assert report["failed_controls"] == ["S-5"]
    s5 = next(c for c in report["controls"] if c["id"] == "S-5")
    assert s5["evidence"]["offenders"] == [f"{ledger} (-rw-r--r--)"]


def test_an_expired_certificate_fails_s7(quickstart, env, tmp_path):
    keys = tmp_path / "keys"
    made = run_cli_here("keys", "--out", str(keys), "--nodes", "1", env=env)
    assert made.returncode == 0, made.stderr
    fresh = run_cli_here("review", str(quickstart), "--keys", str(keys), "--out", str(tmp_path / "r0"), env=env)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert next(c for c in _report(tmp_path / "r0")["controls"] if c["id"] == "S-7")["status"] == PASS
    reissue_expired(keys)
    proc = run_cli_here("review", str(quickstart), "--keys", str(keys), "--out", str(tmp_path / "r"), env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = _report(tmp_path / "r")
    assert report["failed_controls"] == ["S-7"]
    s7 = next(c for c in report["controls"] if c["id"] == "S-7")
    assert re.search(r"superlink\.crt expired on \d{4}-\d{2}-\d{2}", s7["reason"]), s7["reason"]


def test_a_ledger_rolled_back_after_an_earlier_review_fails_c4(quickstart, env, tmp_path):
    """Whoever holds the server's files and key rolls the run back to before its key rotation
    (ledger, signed head and the server's witness together, so the audit cannot tell): the review
    that saw the longer ledger can."""
    home, run = tmp_path / "home", tmp_path / "run"
    shutil.copytree(env["FEDPRIV_HOME"], home)
    shutil.copytree(quickstart, run, ignore=shutil.ignore_patterns("reviews"))
    mine = {**env, "FEDPRIV_HOME": str(home)}
    run_id = json.loads((run / "summary.json").read_text())["run_id"]
    witness = home / "ledger-witness" / "runs" / f"{run_id}.json"
    saved = {p: p.read_bytes() for p in (run / "ledger.jsonl", run / "ledger.head.json", witness)}
    rotated = run_cli_here("keys", "rotate", str(run), env=mine)
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    before = run_cli_here("review", str(run), "--out", str(tmp_path / "r1"), env=mine)
    assert before.returncode == 0, before.stdout + before.stderr
    for path, data in saved.items():  # the rollback
        path.write_bytes(data)
    audit = run_cli_here("audit", str(run), "--json", env=mine)
    assert audit.returncode == 0, audit.stdout[-2000:]  # coherent: the audit alone cannot see it
    alone = run_cli_here("review", str(run), "--out", str(tmp_path / "r2"), env=mine)
    assert alone.returncode == 0, alone.stdout
    proc = run_cli_here("review", str(run), "--since", str(tmp_path / "r1" / "review.json"),
                        "--out", str(tmp_path / "r3"), env=mine)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = _report(tmp_path / "r3")
    assert report["failed_controls"] == ["C-4"]
    c4 = next(c for c in report["controls"] if c["id"] == "C-4")
    assert c4["evidence"]["earlier"]["entries"] == c4["evidence"]["now"]["entries"] + 1
    assert {"id": "C-4", "run": run_id, "before": NOT_APPLICABLE, "now": FAIL} in report["since"]["controls_changed"]
    # --since with a report that does not verify is bad input, not a finding.
    forged = tmp_path / "forged.json"
    forged.write_bytes((tmp_path / "r1" / "review.json").read_bytes().replace(b'"verdict":"pass"', b'"verdict":"fail"'))
    bad = run_cli_here("review", str(run), "--since", str(forged), "--out", str(tmp_path / "r4"), env=mine)
    assert bad.returncode == 2 and "--since" in bad.stderr and "does not verify" in bad.stderr, bad.stderr


def test_a_nodes_state_and_a_later_review_since_the_first(first_review, quickstart, env, tmp_path):
    node = run_cli_here("review", str(quickstart / "nodes" / "sim-0"), "--out", str(tmp_path / "node"), env=env)
    assert node.returncode == 0, node.stdout + node.stderr
    report = _report(tmp_path / "node")
    assert report["target"]["kind"] == "node state"
    p2 = next(c for c in report["controls"] if c["id"] == "P-2")
    assert p2["status"] == PASS and len(p2["evidence"]["runs"]) == 1
    later = run_cli_here("review", str(quickstart), "--since", str(first_review[1] / "review.json"),
                         "--out", str(tmp_path / "later"), env=env)
    assert later.returncode == 0, later.stdout
    since = _report(tmp_path / "later")["since"]
    assert since["new_runs"] == [] and since["epsilon_spent_since"] == {}
    assert next(c for c in _report(tmp_path / "later")["controls"] if c["id"] == "C-4")["status"] == PASS


@pytest.mark.parametrize("args, message", [
    (["review"], "give TARGET"),
    (["review", "/nonexistent/run"], "nothing to review"),
    (["review", "--verify", "/nonexistent/review.json"], "needs --public-key"),
    (["review", "{run}", "--policy", "{bad}"], "malformed TOML"),
    (["review", "{run}", "--policy", "{unknown}"], "unknown key privacy.max_epsilon"),
    (["review", "{run}", "--policy", "{wrong}"], "privacy.unit = 'users' is not one of"),
])
def test_bad_input_is_one_error_line(quickstart, env, tmp_path, args, message):
    files = {"bad": "[privacy\n", "unknown": "[privacy]\nmax_epsilon = 1\n", "wrong": "[privacy]\nunit = 'users'\n"}
    for name, text in files.items():
        (tmp_path / f"{name}.toml").write_text(text)
    filled = [a.format(run=quickstart, **{n: tmp_path / f"{n}.toml" for n in files}) for a in args]
    proc = run_cli_here(*filled, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


# ---- the HTML page in a real browser --------------------------------------------------------------
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium(page: Path, tmp: Path, *extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Open ``page`` in headless Chromium with a NetLog; return the run and the URLs the page
    itself asked the network for (Chromium's own background requests have no file:// site)."""
    netlog = tmp / f"{page.stem}-netlog.json"
    proc = subprocess.run([CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={tmp / 'profile'}", f"--log-net-log={netlog}",
                           *extra, page.as_uri()], capture_output=True, text=True, timeout=120)
    log = json.loads(netlog.read_text())
    names = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    requested = [e["params"]["url"] for e in log["events"]
                 if names.get(e["type"]) == "URL_REQUEST_START_JOB"
                 and "file://" in str(e["params"].get("network_isolation_key", ""))
                 and not e["params"]["url"].startswith(("file:", "data:"))]
    return proc, requested


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)")
def test_the_html_page_renders_in_chromium_and_loads_nothing(first_review, tmp_path):
    _, out = first_review
    page = out / "review.html"
    shot = tmp_path / "review.png"
    proc, requested = _chromium(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,1600")
    assert shot.is_file() and shot.stat().st_size > 20_000, proc.stderr[-2000:]
    assert requested == []
    dom, _ = _chromium(page, tmp_path, "--dump-dom")
    text = re.sub(r"<[^>]+>", " ", dom.stdout)
    statement = _report(out)["runs"][0]["statement"]
    assert "Verdict: PASS" in text
    assert f"epsilon = {statement['record_level']['epsilon_rdp']:.4f}" in text
    assert 'src="data:image/png;base64,' in dom.stdout  # the epsilon plot, inline
    # The check can fail: the same page without its Content-Security-Policy and with a remote
    # image asks the network for it.
    leaky = tmp_path / "leaky.html"
    leaky.write_text(re.sub(r"<meta http-equiv=\"Content-Security-Policy\"[^>]*>", "", page.read_text())
                     .replace("</body>", '<img src="http://127.0.0.1:9/pixel.png"></body>'))
    _, leaked = _chromium(leaky, tmp_path, "--dump-dom")
    assert leaked == ["http://127.0.0.1:9/pixel.png"]
