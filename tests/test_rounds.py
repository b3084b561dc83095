"""The round-state object (server.rounds) that holds the strategy's per-round bookkeeping."""

from __future__ import annotations

from fedpriv.server.rounds import NO_REPLY, Rounds


def test_a_rounds_failures_are_one_line_per_sampled_node():
    rounds = Rounds()
    state = rounds[3]
    assert 3 in rounds and 4 not in rounds and not state.planned
    state.plan(10, 2.5)
    state.sampled = {1, 2, 3, 4}
    state.drop(1, "refused: policy")
    state.drop(2)  # no reply at all
    state.drop(9, "not sampled")  # an error from a node the round never sampled is not reported
    state.malformed[3] = "malformed privacy record (bad)"
    state.drop(3, "timeout")  # the malformed record is the reason that counts
    assert state.planned and (state.population, state.expected) == (10, 2.5)
    assert state.error_lines() == [
        "node 1: refused: policy", f"node 2: {NO_REPLY}", "node 3: malformed privacy record (bad)",
    ]
    assert state.dropped_sampled() == {1, 2, 3}
    assert rounds[3] is state  # one object per round
