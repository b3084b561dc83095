"""What the server learns during a run, round by round: the source of the run's report.

Only what the server knows itself or what the accounting covers: its evaluation of each round's
global model on its own test data, the record- and user-level epsilons from the ledger's events,
how many sampled clients replied or failed, and the round's wall time. Clients' training loss,
example counts and update norms never reach the server (see clients.app).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

from fedpriv.common.protocol import CLIENT_ID, RECORD_EPSILON

# Per-round fields of older checkpoints that are no longer kept (a resume drops them).
RETIRED_FIELDS = frozenset({"train_loss"})


@dataclass
class RoundEntry:
    round: int
    accuracy: float | None = None  # accuracy and loss: the server's evaluation on its own test data
    loss: float | None = None
    record_epsilon_max: float | None = None
    user_epsilon: float | None = None
    clipping_norm: float | None = None  # the round's user-level clipping norm (moves with adaptive clipping)
    clients_trained: int = 0
    clients_failed: int = 0
    seconds: float | None = None
    failed: str | None = None  # why the round produced no aggregate


@dataclass
class RunLog:
    """Per-round metrics plus the latest cumulative record-level epsilon of every client."""

    rounds: dict[int, RoundEntry] = field(default_factory=dict)
    initial_accuracy: float | None = None
    initial_loss: float | None = None
    client_epsilon: dict[str, float] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    on_round: Callable[[RoundEntry], None] | None = None

    def entry(self, server_round: int) -> RoundEntry:
        return self.rounds.setdefault(server_round, RoundEntry(server_round))

    def record_train(self, server_round: int, replies: list[dict[str, Any]], errors: list[str]) -> None:
        """``replies``: one dict per successful reply, the client's id and the server's own
        record-level epsilon for it (:data:`CLIENT_ID`, :data:`RECORD_EPSILON`); ``errors``:
        failure reasons."""
        entry = self.entry(server_round)
        entry.clients_trained = len(replies)
        entry.clients_failed = len(errors)
        self.failures += [{"round": server_round, "reason": reason} for reason in errors]
        for seen in replies:
            if RECORD_EPSILON in seen:
                self.client_epsilon[str(int(seen.get(CLIENT_ID, -1)))] = float(seen[RECORD_EPSILON])
        # The run's record-level figure is the largest any client has reached so far.
        if self.client_epsilon:
            entry.record_epsilon_max = max(self.client_epsilon.values())

    def record_round_failure(self, server_round: int, reason: str) -> None:
        self.entry(server_round).failed = reason
        self.failures.append({"round": server_round, "reason": f"round failed: {reason}"})

    def state(self) -> dict[str, Any]:
        """Everything but the callback, as JSON (a checkpoint keeps it for a resume)."""
        return {
            "rounds": [asdict(self.rounds[r]) for r in sorted(self.rounds)],
            "initial_accuracy": self.initial_accuracy,
            "initial_loss": self.initial_loss,
            "client_epsilon": dict(self.client_epsilon),
            "failures": list(self.failures),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state` (raises KeyError/TypeError if it is malformed)."""
        known = {f.name for f in fields(RoundEntry)}
        unknown = {key for r in state["rounds"] for key in r} - known - RETIRED_FIELDS
        if unknown:
            raise TypeError(f"unknown round fields {sorted(unknown)}")
        self.rounds = {int(r["round"]): RoundEntry(**{k: v for k, v in r.items() if k in known})
                       for r in state["rounds"]}
        self.initial_accuracy = state["initial_accuracy"]
        self.initial_loss = state["initial_loss"]
        self.client_epsilon = {str(k): float(v) for k, v in state["client_epsilon"].items()}
        self.failures = list(state["failures"])

    def record_evaluation(self, server_round: int, accuracy: float, loss: float, seconds: float | None) -> None:
        if server_round == 0:
            self.initial_accuracy, self.initial_loss = accuracy, loss
            return
        entry = self.entry(server_round)
        entry.accuracy, entry.loss, entry.seconds = accuracy, loss, seconds
        if self.on_round is not None:
            self.on_round(entry)
