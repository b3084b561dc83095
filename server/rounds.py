"""Round bookkeeping: everything the server learns about one round, in one object.

:class:`server.strategy.FedprivStrategy` plans a round (population, expected clients), samples
clients, observes their replies as they arrive (through :class:`server.strategy.ObservedGrid`),
and aggregates or fails the round. What it learns on the way lives in the round's
:class:`RoundState`, keyed by the run's round number in :class:`Rounds`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NO_REPLY = "no reply (dropped out or timed out)"


@dataclass
class RoundState:
    """One round, as the server saw it."""

    population: int | None = None  # connected nodes when the round was planned (None: not planned)
    expected: float = 0.0  # the expected number of sampled clients
    sampled: set[int] = field(default_factory=set)  # node ids sent a training message
    replies: dict[int, dict[str, Any]] = field(default_factory=dict)  # node -> what the server keeps
    malformed: dict[int, str] = field(default_factory=dict)  # node -> why its reply cannot be used
    dropped: set[int] = field(default_factory=set)  # nodes that sent an error or no reply
    errors: dict[int, str] = field(default_factory=dict)  # node -> its error reply's reason
    failed: str | None = None  # why the round failed, once known
    aggregated: bool = False

    @property
    def planned(self) -> bool:
        return self.population is not None

    def plan(self, population: int, expected: float) -> None:
        self.population, self.expected = population, expected

    def drop(self, node: int, reason: str | None = None) -> None:
        """``node`` sent an error (``reason``) or no reply at all."""
        self.dropped.add(node)
        if reason is not None:
            self.errors[node] = reason

    def error_lines(self) -> list[str]:
        """One line per sampled node that failed this round (however many stages it missed)."""
        reasons = dict(self.errors)
        reasons.update(self.malformed)
        for node in self.dropped:
            reasons.setdefault(node, NO_REPLY)
        return [f"node {node}: {reason}" for node, reason in sorted(reasons.items()) if node in self.sampled]

    def dropped_sampled(self) -> set[int]:
        return self.dropped & self.sampled


class Rounds:
    """The run's rounds by number; a round's state exists from the first time it is named."""

    def __init__(self) -> None:
        self._rounds: dict[int, RoundState] = {}

    def __getitem__(self, server_round: int) -> RoundState:
        return self._rounds.setdefault(server_round, RoundState())

    def __contains__(self, server_round: object) -> bool:
        return server_round in self._rounds
