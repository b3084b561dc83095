"""The ledger vocabulary (common/ledger_schema.py) and the one replay (common/replay.py).

The expected states below are written out by hand from what the test appends, never computed by
the code under test.
"""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import dp_accounting
import pytest

from fedpriv.common.ledger import LEDGER, LedgerWriter, canonical, load_or_create_signing_key, verify_ledger
from fedpriv.common.ledger_schema import (
    NODE, SERVER, Actor, Kind, Role, client_actor, client_id_of, node_actor, operator_actor, parse_actor,
)
from fedpriv.common.replay import BudgetInForce, replay

ROOT = Path(__file__).resolve().parents[1]

CARRIED = dp_accounting.SelfComposedDpEvent(
    dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.0)), 40)
SPEND_1 = dp_accounting.SelfComposedDpEvent(
    dp_accounting.PoissonSampledDpEvent(0.08, dp_accounting.GaussianDpEvent(1.2)), 13)
SPEND_2 = dp_accounting.SelfComposedDpEvent(
    dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.5)), 7)
USER_1 = dp_accounting.PoissonSampledDpEvent(0.3, dp_accounting.GaussianDpEvent(2.0))
USER_3 = dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(1.8))
CONFIG = {"privacy.delta": 1e-5, "run.rounds": 4}


def _write(tmp_path: Path) -> Path:
    """A run ledger of every kind the server writes, through the real writer."""
    key = load_or_create_signing_key(tmp_path / "keys" / "server.key")
    run = tmp_path / "run"
    writer = LedgerWriter(run, key)
    writer.append(actor=SERVER, kind=Kind.RUN_START, parameters={  # 0
        "config": CONFIG, "delta": 1e-5, "record_budget": 8.0, "user_budget": 4.0, "run_id": "r1",
        "flower_run_id": "11"})
    writer.append(actor=client_actor(1), kind=Kind.RECORD_LEVEL_CARRIED, round=1, event=CARRIED,  # 1
                  parameters={"spends": []}, sampling="poisson", epsilon={"rdp": 0.5})
    writer.append(actor=client_actor(1), kind=Kind.RECORD_LEVEL, round=1, event=SPEND_1,  # 2
                  parameters={"steps": 13}, sampling="poisson", epsilon={"rdp": 0.9})
    writer.append(actor=client_actor(2), kind=Kind.RECORD_LEVEL, round=1, event=SPEND_2,  # 3
                  parameters={"steps": 7}, sampling="poisson", epsilon={"rdp": 0.6})
    writer.append(actor=SERVER, kind=Kind.USER_LEVEL, round=1, event=USER_1,  # 4
                  parameters={"delta_addition": 1e-9, "population": 10}, sampling="poisson", epsilon={"rdp": 1.1})
    writer.append(actor=node_actor(7), kind=Kind.REFUSAL, round=2, note="budget exhausted")  # 5
    writer.append(actor=SERVER, kind=Kind.ROUND_FAILED, round=2, note="too few replies")  # 6
    writer.append(actor=SERVER, kind=Kind.RUN_END, epsilon={"user_level": {"rdp": 1.1}})  # 7: ended, then resumed
    writer.append(actor=SERVER, kind=Kind.RUN_RESUME, round=3, parameters={  # 8
        "config": {**CONFIG, "run.rounds": 6}, "delta": 1e-5, "record_budget": 6.0, "user_budget": 0,
        "run_id": "r1", "flower_run_id": "12"})
    writer.append(actor=SERVER, kind=Kind.USER_LEVEL, round=3, event=USER_3,  # 9
                  parameters={"population": 10}, sampling="poisson", epsilon={"rdp": 1.6})
    writer.append(actor=SERVER, kind=Kind.BUDGET_STOP, round=4, note="would pass 4", epsilon={"rdp": 1.6})  # 10
    writer.append(actor=SERVER, kind=Kind.RUN_END, epsilon={"user_level": {"rdp": 1.6}}, note="stopped")  # 11
    return run


def test_enums_are_the_strings_on_disk(tmp_path):
    run = _write(tmp_path)
    lines = [json.loads(line) for line in (run / LEDGER).read_text().splitlines()]
    assert [line["kind"] for line in lines] == [
        "run_start", "record_level_carried", "record_level", "record_level", "user_level", "refusal",
        "round_failed", "run_end", "run_resume", "user_level", "budget_stop", "run_end"]
    assert [line["actor"] for line in lines[:6]] == ["server", "client:1", "client:1", "client:2", "server", "node:7"]
    # the canonical bytes (what is hashed and signed) are those of the plain strings
    assert canonical({"kind": Kind.RUN_START, "actor": client_actor(3)}) == b'{"actor":"client:3","kind":"run_start"}'
    assert Kind("record_level") is Kind.RECORD_LEVEL and Kind.RECORD_LEVEL == "record_level"


def test_actor_helpers():
    assert client_actor(3) == "client:3" and node_actor() == "node" and node_actor("a") == "node:a"
    assert operator_actor("ann") == "operator:ann" and operator_actor(None) == "operator:unknown"
    assert parse_actor("client:3") == Actor(Role.CLIENT, "3", "client:3")
    assert parse_actor("server") == Actor(Role.SERVER, None, "server")
    assert parse_actor("node") == Actor(Role.NODE, None, "node")
    assert parse_actor("martian:1") == Actor(None, None, "martian:1")
    assert client_id_of("client:12") == "12" and client_id_of("server") is None
    assert SERVER == "server" and NODE == "node"


def test_replay_of_a_written_ledger(tmp_path):
    report = verify_ledger(_write(tmp_path))
    assert report.ok, report.failures
    before = copy.deepcopy(report.entries)
    state = replay(report.entries)
    assert report.entries == before  # pure: the entries are not touched
    assert state.entries == 12 and state.unreadable == []

    # per-actor events, in order, with round and kind, and the epsilons the writer recorded
    assert set(state.actors) == {"client:1", "client:2", "server"}
    one = state.actors["client:1"]
    assert one.events == [CARRIED, SPEND_1]
    assert [(s.seq, s.round, s.kind) for s in one.spends] == [
        (1, 1, Kind.RECORD_LEVEL_CARRIED), (2, 1, Kind.RECORD_LEVEL)]
    assert one.recorded_epsilons == [0.5, 0.9] and one.carried
    assert state.actors["client:2"].events == [SPEND_2] and not state.actors["client:2"].carried
    assert state.actors["client:2"].recorded_epsilons == [0.6]
    assert set(state.clients()) == {"1", "2"}
    assert [s.event for s in state.user_level()] == [USER_1, USER_3]
    assert [(s.seq, s.round) for s in state.user_level()] == [(4, 1), (9, 3)]
    assert [s.delta_addition for s in state.user_level()] == [1e-9, 0.0]
    assert state.actors["server"].recorded_epsilons == [1.1, 1.6]

    # runs, their configurations and budgets
    assert [(r.seq, r.kind, r.round, r.run_id, r.flower_run_id) for r in state.runs] == [
        (0, Kind.RUN_START, None, "r1", "11"), (8, Kind.RUN_RESUME, 3, "r1", "12")]
    assert state.run_id == "r1" and state.delta == 1e-5
    assert state.runs[0].budgets == {"record_budget": 8.0, "user_budget": 4.0}
    assert state.runs[1].budgets == {"record_budget": 6.0, "user_budget": None}  # 0: no limit
    assert state.config == {**CONFIG, "run.rounds": 6}  # the latest one
    assert [r.seq for r in state.resumes] == [8]

    # every budget ever in force, with its entry and round; the strictest of each
    assert state.budgets == [BudgetInForce("record_budget", 8.0, 0, None), BudgetInForce("user_budget", 4.0, 0, None),
                             BudgetInForce("record_budget", 6.0, 8, 3)]
    assert state.budgets_in_force() == {"record_budget": 6.0, "user_budget": 4.0}
    assert state.strictest("user_budget") == BudgetInForce("user_budget", 4.0, 0, None)

    # what else happened
    assert [(r.seq, r.round, r.actor, r.note) for r in state.refusals] == [(5, 2, "node:7", "budget exhausted")]
    assert [(f.seq, f.round, f.note) for f in state.round_failures] == [(6, 2, "too few replies")]
    assert [(b.seq, b.round) for b in state.budget_stops] == [(10, 4)]
    assert state.stopped is not None and state.stopped.note == "would pass 4"
    assert [e.seq for e in state.run_ends] == [7, 11]
    assert state.run_end is not None and state.run_end.seq == 11 and state.run_end.note == "stopped"
    assert state.recoveries == []


def test_an_end_before_a_resume_no_longer_ends_the_run(tmp_path):
    entries = verify_ledger(_write(tmp_path)).entries
    state = replay(entries[:9])  # up to the run_resume
    assert [e.seq for e in state.run_ends] == [7] and state.run_end is None and state.stopped is None


def test_recoveries_and_node_ledgers(tmp_path):
    key = load_or_create_signing_key(tmp_path / "node.key")
    writer = LedgerWriter(tmp_path / "node", key)
    writer.append(actor=NODE, kind=Kind.RECORD_LEVEL, round=1, event=SPEND_1, parameters={"run_id": "a"})
    writer.append(actor=NODE, kind=Kind.POLICY_REFUSAL, round=2, note="weak")
    with (tmp_path / "node" / LEDGER).open("ab") as handle:
        handle.write(b'{"torn')  # a write cut short
    reopened = LedgerWriter(tmp_path / "node", key)  # recovers, and records it
    state = replay(reopened.existing + [json.loads((tmp_path / "node" / LEDGER).read_text().splitlines()[-1])])
    assert state.actors["node"].events == [SPEND_1]
    assert state.actors["node"].spends[0].parameters == {"run_id": "a"}
    assert [(r.kind, r.note) for r in state.refusals] == [(Kind.POLICY_REFUSAL, "weak")]
    assert len(state.recoveries) == 1 and state.recoveries[0].actor == "ledger"
    assert state.runs == [] and state.run_id is None


def test_an_unreadable_event_is_reported_not_dropped_silently():
    entry = {"seq": 0, "round": 1, "actor": "client:1", "kind": "record_level", "event": {"type": "NoSuchDpEvent"}}
    state = replay([entry])
    assert state.actors == {} and [(u.seq, u.actor) for u in state.unreadable] == [(0, "client:1")]


# ---- source scans -------------------------------------------------------------------------------
PRODUCTION = ("common", "server", "clients", "fedpriv", "simulations")
SCHEMA = ROOT / "common" / "ledger_schema.py"
KIND_STRINGS = {k.value for k in Kind}
ACTOR_PREFIXES = tuple(f"{r.value}:" for r in (Role.CLIENT, Role.NODE, Role.OPERATOR))  # actors with an id


def _sources() -> list[Path]:
    return [p for folder in PRODUCTION for p in sorted((ROOT / folder).rglob("*.py")) if p != SCHEMA]


def _literals(node: ast.AST) -> list[str]:
    """String constants in an expression (a constant, or a tuple/list/set of them)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [v for elt in node.elts for v in _literals(elt)]
    return []


def _is_entry_kind(node: ast.AST) -> bool:
    """``entry["kind"]`` or ``entry.get("kind")``: an entry's kind as read from a ledger."""
    if isinstance(node, ast.Subscript):
        return _literals(node.slice) == ["kind"]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return bool(node.args) and _literals(node.args[0]) == ["kind"]
    return False


def _problems(source: str, name: str) -> list[str]:
    tree = ast.parse(source, name)
    found = []
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            entry_kind = any(_is_entry_kind(side) for side in sides)
            # any literal against an entry's kind; a kind's string against anything (record_level
            # and user_level are also the summary's keys, so those only where they meet a kind)
            named = any(isinstance(side, (ast.Name, ast.Attribute)) and
                        (getattr(side, "id", None) or getattr(side, "attr", None)) == "kind" for side in sides)
            found += [f"{where}: kind compared with {lit!r}" for side in sides for lit in _literals(side)
                      if entry_kind or lit in KIND_STRINGS - ({"record_level", "user_level"} if not named else set())]
        if isinstance(node, ast.keyword) and node.arg in ("kind", "actor"):
            if _literals(node.value) or isinstance(node.value, ast.JoinedStr):
                found.append(f"{where}: {node.arg}= given as a string literal")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(ACTOR_PREFIXES):
            found.append(f"{where}: actor prefix {node.value!r} spelled out")
        if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant) \
                and str(node.values[0].value).startswith(ACTOR_PREFIXES):
            found.append(f"{where}: actor built from an f-string")
    return found


def test_no_kind_or_actor_literal_outside_the_schema():
    problems = [problem for path in _sources() for problem in _problems(path.read_text(), str(path.relative_to(ROOT)))]
    assert problems == []


def test_the_scan_catches_what_it_looks_for():
    source = ('def f(e, w):\n    if e.get("kind") == "run_start":\n        pass\n'
              '    w.append(actor=f"client:{1}", kind="user_level")\n    return e["actor"].removeprefix("node:")\n'
              'def g(entry):\n    return entry["kind"] in ("user_level", "refusal")\n')
    problems = _problems(source, "probe.py")
    assert {p.split(":")[1] for p in problems} == {"2", "4", "5", "7"}, problems
    assert _problems('def f(w):\n    w.append(actor=SERVER, kind=Kind.RUN_START)\n', "ok.py") == []


# resume: common/settings.py (what --resume may change) and server/resume.py (through its ledger_state)
@pytest.mark.parametrize("module", ["server/privacy.py", "clients/budget.py", "common/settings.py", "common/audit.py"])
def test_the_consumers_call_the_one_replay(module):
    tree = ast.parse((ROOT / module).read_text())
    imported = any(isinstance(n, ast.ImportFrom) and n.module == "fedpriv.common.replay"
                   and any(a.name == "replay" for a in n.names) for n in ast.walk(tree))
    called = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "replay"
                 for n in ast.walk(tree))
    assert imported and called, f"{module} does not call common.replay.replay"
    # and none of them reads events out of entries itself
    assert not any(isinstance(n, ast.Name) and n.id == "event_from_json" for n in ast.walk(tree))


def test_the_resume_checks_read_the_ledger_through_the_replay():
    tree = ast.parse((ROOT / "server/resume.py").read_text())
    assert any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "ledger_state"
               for n in ast.walk(tree))
    assert not any(isinstance(n, ast.Name) and n.id == "event_from_json" for n in ast.walk(tree))
