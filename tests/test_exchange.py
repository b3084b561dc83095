"""How the ServerApp waits for an exchange's replies (``server.strategy.exchange``).

A grid here is a stand-in with the two calls ``exchange`` uses, ``push_messages`` and
``pull_messages``, whose nodes reply at set times on a simulated clock, so the test sees every
look and every wait without sleeping. Flower's deployment grid looks every 3 s, so the last reply of
an exchange waited up to 3 s to be seen; here it is seen within the interval ``pull_interval`` gives.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedpriv.server.strategy import MAX_PULL_S, MIN_PULL_S, NET_MAX_PULL_S, NET_MIN_PULL_S, exchange, pull_interval


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.waits.append(seconds)
        self.now += seconds


class TimedGrid:
    """Each pushed message is answered at the time given for its destination node."""

    def __init__(self, clock: Clock, answer_at: dict[int, float]) -> None:
        self.clock, self.answer_at = clock, answer_at
        self.pushed: dict[str, int] = {}
        self.delivered: set[str] = set()
        self.pulls: list[set[str]] = []

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message_id = f"m{message.node}"
            self.pushed[message_id] = message.node
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        asked = set(message_ids)
        self.pulls.append(asked)
        ready = [i for i in sorted(asked, key=lambda i: self.answer_at[self.pushed[i]])
                 if i not in self.delivered and self.answer_at[self.pushed[i]] <= self.clock.now]
        self.delivered.update(ready)
        return [SimpleNamespace(node=self.pushed[i], metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]


def messages(*nodes: int) -> list:
    return [SimpleNamespace(node=n) for n in nodes]


def test_the_last_reply_is_collected_within_one_interval_and_each_reply_once():
    clock = Clock()
    grid = TimedGrid(clock, {1: 0.3, 2: 1.0, 3: 2.0})
    replies = exchange(grid, messages(1, 2, 3), timeout=60, sleep=clock.sleep, clock=clock)
    assert [r.node for r in replies] == [1, 2, 3]
    assert 2.0 <= clock.now <= 2.0 + NET_MIN_PULL_S  # Flower's deployment grid: 3.0 s
    assert all(w == NET_MIN_PULL_S for w in clock.waits)
    # a look asks only for replies still outstanding
    assert grid.pulls[0] == {"m1", "m2", "m3"} and grid.pulls[-1] == {"m3"}


def test_a_timeout_returns_the_replies_so_far_and_never_waits_past_it():
    clock = Clock()
    grid = TimedGrid(clock, {1: 0.1, 2: 50.0})
    replies = exchange(grid, messages(1, 2), timeout=1.1, sleep=clock.sleep, clock=clock)
    assert [r.node for r in replies] == [1]
    assert clock.now == pytest.approx(1.1)


def test_without_a_timeout_it_waits_for_every_reply():
    clock = Clock()
    grid = TimedGrid(clock, {1: 0.0, 2: 7200.0})
    replies = exchange(grid, messages(1, 2), timeout=None, sleep=clock.sleep, clock=clock)
    assert [r.node for r in replies] == [1, 2] and clock.now >= 7200.0


def test_replies_present_at_once_need_no_wait():
    clock = Clock()
    replies = exchange(TimedGrid(clock, {1: 0.0, 2: 0.0}), messages(1, 2), timeout=5, sleep=clock.sleep, clock=clock)
    assert len(replies) == 2 and clock.waits == []


def test_the_interval_grows_with_the_replies_awaited_up_to_flowers_own():
    network = TimedGrid(Clock(), {})
    in_memory = InMemoryGrid.__new__(InMemoryGrid)  # (only its type matters here)
    assert pull_interval(network, 3) == NET_MIN_PULL_S and pull_interval(network, 10**6) == NET_MAX_PULL_S == 3.0
    assert pull_interval(in_memory, 3) == MIN_PULL_S and pull_interval(in_memory, 10**6) == MAX_PULL_S == 0.1
    sizes = [1, 100, 1_000, 3_000, 10_000]
    for grid in (network, in_memory):
        intervals = [pull_interval(grid, n) for n in sizes]
        assert intervals == sorted(intervals)
