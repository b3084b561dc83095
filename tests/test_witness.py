"""Rollback and forgery of the privacy records, played by an attacker who can write the run
directory (and a node's state directory) but not the server's state: `fedpriv audit`, invoked
as the README gives it, must report each (exit 1)."""

import base64
import hashlib
import json
import shutil

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from fedpriv.clients.budget import open_guard
from fedpriv.common.accounting import DPSGDSpend
from fedpriv.common.config import load_config
from fedpriv.common.errors import FedprivError
from fedpriv.common.ledger import HEAD, LEDGER, PUBLIC_KEY, load_or_create_signing_key, verify_ledger
from fedpriv.cli import main
from fedpriv.server.privacy import PrivacyRecorder, signing_key_path
from fedpriv.server.resume import RestorePoint

DELTA = 1e-5
SPEND = DPSGDSpend(0.08, 1.2, 13)


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # rich wraps nothing the tests look for


def _cfg(rounds=4):
    return load_config(overrides=[f"privacy.delta={DELTA}", f"run.rounds={rounds}"])


def _summary(run_dir, figures):
    """summary.json as the server writes its privacy part (what the audit compares)."""
    summary = {"privacy": {"record_level": {"clients": {k: v["rdp"] for k, v in figures["record_level"].items()}},
                           "user_level": {"epsilon": None}}}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def _rounds(recorder, first, last, spend=SPEND, node_dir=None, node_1_dir=None):
    """Clients 0 and 1 spend ``spend`` each round; client 0 (and 1) is a node with its own
    ledger in ``node_dir`` (``node_1_dir``) that records the run head the server sent, as
    clients.app does."""
    for r in range(first, last + 1):
        for cid, directory in (("0", node_dir), ("1", node_1_dir)):
            if directory is None:
                continue
            from fedpriv.common.witness import parse_node_run_head

            head = parse_node_run_head(recorder.run_head())
            with open_guard(directory, 0.0, DELTA) as guard:
                guard.record(spend, r, recorder.run_id, run_head=head, client_id=cid)
        for cid in ("0", "1"):
            recorder.record_client(r, cid, {"prior": [], "round": spend})


def _audit(run_dir, capsys, *extra):
    """``fedpriv audit RUN_DIR`` (the README's invocation): exit code and everything printed."""
    code = main(["audit", str(run_dir), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


def _fingerprint(pem_bytes):
    """The key id, computed here from the raw Ed25519 public key (sha256, first 16 hex digits)."""
    key = serialization.load_pem_public_key(pem_bytes)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _save(run_dir, names=(LEDGER, HEAD, "summary.json")):
    return {name: (run_dir / name).read_bytes() for name in names if (run_dir / name).exists()}


def _restore(run_dir, saved):
    for name, data in saved.items():
        (run_dir / name).write_bytes(data)


def test_run_ledger_rolled_back_to_an_earlier_complete_state_is_caught(tmp_path, capsys):
    """A run ends, is resumed for two more rounds and ends again. The attacker puts back the
    ledger, head and summary of the first end: each is genuine and signed, so only the server's
    witness of the later head can tell."""
    run = tmp_path / "run"
    cfg = _cfg()
    recorder = PrivacyRecorder(cfg, run)
    _rounds(recorder, 1, 2)
    _summary(run, recorder.finish())
    earlier = _save(run)
    point = RestorePoint(round=2, run_id=recorder.run_id, ledger_entries=recorder.ledger.seq,
                         ledger_head=recorder.ledger.prev_hash, weights=[np.zeros(1)], optimizer={},
                         run_log={}, wall_time_s=0.0)
    resumed = PrivacyRecorder(cfg, run, resume=point)
    _rounds(resumed, 3, 4)
    _summary(run, resumed.finish())
    assert _audit(run, capsys)[0] == 0

    _restore(run, earlier)
    assert verify_ledger(run).ok  # the earlier ledger is genuine on its own
    code, out = _audit(run, capsys)
    assert code == 1
    assert "rollback" in out and "witness" in out
    main(["audit", str(run), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert not report["ledger_ok"] and report["witness"]

    # Nor can the rolled-back ledger be continued: the server refuses to resume behind its witness.
    with pytest.raises(FedprivError, match="rolled back"):
        PrivacyRecorder(cfg, run, resume=point)


def test_ledger_re_signed_with_a_fresh_key_and_swapped_ledger_pub_is_caught(tmp_path, capsys, monkeypatch):
    """The attacker builds a ledger at a far higher noise multiplier (a much smaller epsilon)
    with a key of their own, on a server state of their own, and swaps it, its head, its
    ledger.pub and a matching summary.json into the genuine run directory."""
    run = tmp_path / "run"
    recorder = PrivacyRecorder(_cfg(), run)
    _rounds(recorder, 1, 3)
    _summary(run, recorder.finish())
    genuine_pem = (run / PUBLIC_KEY).read_bytes()
    assert _audit(run, capsys)[0] == 0

    with monkeypatch.context() as attacker:
        attacker.setenv("FEDPRIV_LEDGER_KEY", str(tmp_path / "attacker" / "ledger.key"))
        attacker.setenv("FEDPRIV_LEDGER_WITNESS", str(tmp_path / "attacker" / "state"))
        forged_dir = tmp_path / "forged"
        forger = PrivacyRecorder(_cfg(), forged_dir)
        _rounds(forger, 1, 3, spend=DPSGDSpend(0.08, 8.0, 13))
        _summary(forged_dir, forger.finish())
    for name in (LEDGER, HEAD, PUBLIC_KEY, "summary.json"):
        shutil.copyfile(forged_dir / name, run / name)
    assert verify_ledger(run).ok  # it verifies against the ledger.pub beside it

    code, out = _audit(run, capsys)
    assert code == 1
    assert _fingerprint(genuine_pem) in out  # the pinned key is named
    assert _fingerprint((forged_dir / PUBLIC_KEY).read_bytes()) in out  # and the one that signed
    main(["audit", str(run), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["key"]["pinned"] is True and report["key"]["fingerprint"] == _fingerprint(genuine_pem)
    assert not report["ok"] and not report["ledger_ok"]


def test_unpinned_key_is_said_loudly_and_a_pinned_one_is_named(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    recorder = PrivacyRecorder(_cfg(), run)
    _rounds(recorder, 1, 1)
    _summary(run, recorder.finish())
    pem = (run / PUBLIC_KEY).read_bytes()
    # An auditor with no access to the server's state: only ledger.pub is there to trust.
    monkeypatch.setenv("FEDPRIV_HOME", str(tmp_path / "elsewhere"))
    code, out = _audit(run, capsys)
    assert code == 0
    assert "NOT pinned" in out and "TRUSTED" in out and _fingerprint(pem) in out
    assert "NOT pinned" in (run / "audit.md").read_text()
    (tmp_path / "pinned.pub").write_bytes(pem)
    code, out = _audit(run, capsys, "--public-key", str(tmp_path / "pinned.pub"))
    assert code == 0 and "NOT pinned" not in out and f"{_fingerprint(pem)}, pinned from --public-key" in out


@pytest.mark.parametrize("where", ["simulated", "given"])
def test_node_ledger_rolled_back_below_the_run_spends_is_caught(tmp_path, capsys, where):
    """Client 0's node keeps its own ledger. The attacker puts back the node's ledger from after
    round 1, so the node's budget forgets rounds 2 and 3, which the run ledger recorded.
    Simulated nodes live in RUN_DIR/nodes (checked by default); a real node's is given with
    --node-ledger."""
    run = tmp_path / "run"
    node = run / "nodes" / "sim-0" if where == "simulated" else tmp_path / "node-state" / "node-1"
    extra = [] if where == "simulated" else ["--node-ledger", str(node)]
    other = node.parent / "sim-1"  # client 1's node, left alone
    recorder = PrivacyRecorder(_cfg(), run)
    _rounds(recorder, 1, 1, node_dir=node, node_1_dir=other)
    after_round_1 = _save(node, (LEDGER, HEAD))
    _rounds(recorder, 2, 3, node_dir=node, node_1_dir=other)
    _summary(run, recorder.finish())
    code, out = _audit(run, capsys, *extra)
    assert code == 0, out
    assert "3 spend(s) in this run, client 0" in out

    _restore(node, after_round_1)
    assert verify_ledger(node).ok  # the node's earlier ledger is genuine on its own
    code, out = _audit(run, capsys, *extra)
    assert code == 1
    assert "rollback" in out and "missing from node ledger" in out and "[2, 3]" in out


def test_simulated_node_ledger_removed_is_caught(tmp_path, capsys):
    """Simulated nodes keep their ledgers in RUN_DIR/nodes: one removed outright (so the node
    starts from nothing) is missed against the run's spends."""
    run = tmp_path / "run"
    recorder = PrivacyRecorder(_cfg(), run)
    _rounds(recorder, 1, 2, node_dir=run / "nodes" / "sim-0")
    _summary(run, recorder.finish())
    (run / "nodes" / "sim-1").mkdir()  # a node that never spent (and client 1 has none of its own)
    code, out = _audit(run, capsys)
    assert code == 1 and "spends of client 1, but no node ledger" in out  # client 1 spent without one
    shutil.rmtree(run / "nodes" / "sim-0")
    code, out = _audit(run, capsys)
    assert code == 1 and "spends of client 0, but no node ledger" in out


def test_node_ledger_witnesses_the_run_head(tmp_path, capsys):
    """A node recorded the run head it was sent in rounds 2 and 3; a run ledger cut back to
    round 1 (whose own signed head the attacker kept) is behind that witness, even with the
    server's witness gone."""
    run, node = tmp_path / "run", tmp_path / "node"
    recorder = PrivacyRecorder(_cfg(), run)
    _rounds(recorder, 1, 1)
    round_1 = _save(run)
    _rounds(recorder, 2, 3, node_dir=node)
    _summary(run, recorder.finish())
    _restore(run, round_1)
    (run / "summary.json").unlink()
    (witness := next((recorder.witness_root / "runs").glob(f"{recorder.run_id}.json"))).unlink()
    main(["audit", str(run), "--json", "--node-ledger", str(node)])
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and not witness.exists()
    failures = "\n".join(report["failures"])
    assert "rollback" in failures and f"node ledger {node}" in failures and "witness saw" in failures


def test_tampered_node_ledger_is_a_finding(tmp_path, capsys):
    run, node = tmp_path / "run", tmp_path / "node"
    recorder = PrivacyRecorder(_cfg(), run)
    _rounds(recorder, 1, 2, node_dir=node)
    _summary(run, recorder.finish())
    lines = (node / LEDGER).read_bytes().split(b"\n")
    lines[0] = lines[0].replace(b'"steps":13', b'"steps":1')
    (node / LEDGER).write_bytes(b"\n".join(lines))
    code, out = _audit(run, capsys, "--node-ledger", str(node))
    assert code == 1 and "does not verify" in out


def test_missing_summary_is_a_named_finding(tmp_path, capsys):
    run = tmp_path / "run"
    recorder = PrivacyRecorder(_cfg(), run)
    _rounds(recorder, 1, 1)
    _summary(run, recorder.finish())
    (run / "summary.json").unlink()
    code, out = _audit(run, capsys)
    assert code == 1 and "summary.json is missing" in out


def test_signed_head_binds_the_run_id(tmp_path):
    """A head signed by the right key but for another run does not verify."""
    run = tmp_path / "run"
    recorder = PrivacyRecorder(_cfg(), run)
    _rounds(recorder, 1, 1)
    head = json.loads((run / HEAD).read_text())
    assert head["run_id"] == recorder.run_id and head["entries"] == recorder.ledger.seq
    key = load_or_create_signing_key(signing_key_path())

    def resign(body):
        from fedpriv.common.ledger import canonical
        body = {k: v for k, v in body.items() if k != "signature"}
        body["signature"] = base64.b64encode(key.sign(hashlib.sha256(canonical(body)).digest())).decode()
        (run / HEAD).write_text(json.dumps(body))

    resign({**head, "run_id": "another-run"})
    report = verify_ledger(run)
    assert not report.ok and "another-run" in report.failures[0]
    # A head of the format before the run id was bound (older run directories) still verifies.
    resign({k: v for k, v in head.items() if k != "run_id"})
    assert verify_ledger(run).ok
