"""Strategy assembly: Flower's FedAvg or FedAdam, wrapped to aggregate client *updates* under
secure aggregation, apply user-level DP noise, and record and enforce privacy every round.

Clients reply with their update (trained minus global model), already clipped when user-level
DP is on. Under SecAgg+ Flower's ``SecAggPlusWorkflow`` hands :class:`FedprivStrategy` only the
unmasked mean of those updates (every result carries the same aggregate); without it the
strategy averages the individual updates itself with Flower's ``aggregate``. Either way it then
adds the user-level noise (central mode) or decodes the already-noised integer sum (distributed
mode), adds the mean update to the global model, and lets the wrapped Flower strategy (FedAvg, or
FedAdam's server optimizer) produce the next global model.

:class:`ObservedGrid` wraps the Grid the workflow talks through. It records, as replies arrive,
what each client declares it spent and which nodes refused a round, so that a round that never
aggregates (too many SecAgg+ dropouts) still leaves its spending in the ledger.

Rounds: Flower's workflow counts from 1 in every server process. A resumed run continues after
its checkpoint's round, so every round Flower names (``server_round`` arguments, a message's
``group_id``) is shifted by :attr:`FedprivStrategy.round_offset` before anything uses it; the
workflow's initial evaluation (round 0) of a restored model is not recorded again.
"""

from __future__ import annotations

import io
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.common import (
    Code, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar, Status,
    ndarrays_to_parameters, parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAdam, FedAvg, Strategy
from flwr.server.strategy.aggregate import aggregate

from fedpriv.common import secagg, user_dp
from fedpriv.common.canaries import CanaryClients
from fedpriv.common.config import RunConfig
from fedpriv.common.errors import FedprivError
from fedpriv.common.fileio import write_atomic
from fedpriv.common.updates import clip_bound, individual_problem, update_problem
from fedpriv.common.protocol import (
    CLIENT_ID, CLIENTS_SAMPLED, PRIVACY, RECORD_EPSILON, REFUSAL_CODES, RUN_HEAD, RUN_ID,
    SERVER_ROUND, USER_CLIP,
)
from fedpriv.server.privacy import PrivacyRecorder, UserBudgetExhausted
from fedpriv.server.rounds import Rounds
from fedpriv.server.run_log import RunLog

log = logging.getLogger("fedpriv")
class NotEnoughClients(FedprivError):
    """Fewer clients connected than the run needs, within federation.connect_timeout."""


def wait_for_clients(connected: Callable[[], dict[str, ClientProxy]], needed: int, timeout: float,
                     poll: float = 0.5) -> dict[str, ClientProxy]:
    """Wait until ``needed`` nodes are connected (``connected()``: the client manager's ``all``,
    which Flower's compatibility layer refreshes from the grid); return them. Flower's own
    sampling waits without limit, which would hang a misconfigured run forever."""
    deadline = time.monotonic() + timeout
    while len(nodes := connected()) < needed:
        if time.monotonic() >= deadline:
            raise NotEnoughClients(
                f"only {len(nodes)} of the {needed} clients the run needs connected within "
                f"{timeout:g} s (federation.min_available_clients / min_train_clients; under "
                f"flwr run, set --federation-config \"num-supernodes=N\")"
            )
        time.sleep(poll)
    return nodes


def build_inner_strategy(cfg: RunConfig, initial: Parameters) -> Strategy:
    """The Flower strategy that turns the mean update into the next global model."""
    federation = cfg.federation
    common = {
        "fraction_fit": federation.fraction_train,
        "fraction_evaluate": 0.0,
        "min_fit_clients": federation.min_train_clients,
        "min_available_clients": federation.min_available_clients,
        "initial_parameters": initial,
    }
    if federation.strategy == "fedadam":
        return FedAdam(eta=federation.server_learning_rate, **common)
    return FedAvg(**common)


def parse_declaration(metrics: dict[str, Any]) -> dict[str, Any]:
    """Read the privacy part of a client's reply metrics (raises on anything malformed)."""
    privacy = {key[len(PRIVACY) + 1:]: value for key, value in metrics.items()
               if key.startswith(PRIVACY + ".")}
    return PrivacyRecorder.parse_declaration(privacy)


def reply_metrics(content: Any) -> dict[str, Any] | None:
    """The metrics of a training reply, read through Flower's own conversion of a reply to a
    legacy ``FitRes`` (the one its workflows and mods use); None for a reply that holds no
    training result (SecAgg+ key exchange and unmasking). TypeError for metrics a FitRes cannot
    hold."""
    try:
        fitres = compat.recorddict_to_fitres(content, keep_input=True)
    except KeyError:
        return None
    return dict(fitres.metrics)


def pull_interval(grid: Any, awaited: int) -> float:
    """Seconds between the server's looks for replies, while ``awaited`` replies are outstanding.

    Flower's grids push an exchange's messages, then look for replies at a fixed interval: 0.1 s
    in a simulation's in-memory grid, 3 s in a deployment's HTTP grid. Each exchange of a round
    (one without SecAgg+, four with it) then waits half an interval on average after its last
    reply: in a deployment, about 1.5 s an exchange, 6 s a SecAgg+ round. (A deployment's nodes
    look for their next message every 3 s too, in Flower's SuperNode, which this leaves alone: in
    the README's walk-through, the last reply of a round's unmasking stage was aggregated 1.05 s
    after it was sent, against 3.2 s before, while each stage's messages still reached the nodes
    2-4 s after the previous stage's last reply.)

    - In memory (a simulation), a look's cost grows with the replies awaited, and it holds the
      lock the nodes' replies need: 5 ms up to 50 replies, Flower's 0.1 s from 1,000 on.
    - Over the network (a deployment), each look is a request to the SuperLink: 0.25 s up to 250
      replies, growing with them to Flower's 3 s from 3,000 on.
    """
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    if isinstance(grid, InMemoryGrid):
        return min(max(PULL_S_PER_REPLY * awaited, MIN_PULL_S), MAX_PULL_S)
    return min(max(NET_PULL_S_PER_REPLY * awaited, NET_MIN_PULL_S), NET_MAX_PULL_S)


MIN_PULL_S, PULL_S_PER_REPLY, MAX_PULL_S = 0.005, 1e-4, 0.1
NET_MIN_PULL_S, NET_PULL_S_PER_REPLY, NET_MAX_PULL_S = 0.25, 1e-3, 3.0


def exchange(grid: Any, messages: list[Any], timeout: float | None,
             sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> list[Any]:
    """Flower's ``Grid.send_and_receive`` through the grid's own ``push_messages`` and
    ``pull_messages``, looking for replies every :func:`pull_interval` instead of at the grid's
    fixed interval. As Flower's: the replies that arrived before ``timeout`` seconds (None: until
    every message has one), in arrival order.

    To drop this: when Flower's grids take the interval as a setting (or stop polling), set it
    in :class:`ObservedGrid` and call the grid's own ``send_and_receive``."""
    pending = set(grid.push_messages(messages))
    deadline = None if timeout is None else clock() + timeout
    replies: list[Any] = []
    while deadline is None or clock() < deadline:
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
        if not pending:
            break
        wait = pull_interval(grid, len(pending))
        sleep(wait if deadline is None else max(0.0, min(wait, deadline - clock())))
    return replies


class ObservedGrid:
    """A Grid that records privacy-relevant replies as they arrive (see the module doc).

    ``on_exchange(sent, replies)``, if given, sees every exchange; tests use it to capture what
    the server receives.
    """

    def __init__(self, grid: Any, strategy: FedprivStrategy,
                 on_exchange: Callable[[list, list], None] | None = None) -> None:
        self._grid = grid
        self._strategy = strategy
        self._on_exchange = on_exchange

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
        sent = list(messages)
        if timeout is None:
            timeout = self._strategy.cfg.federation.round_timeout
        replies = exchange(self._grid, sent, timeout)
        for reply in replies:
            self._strategy.observe_reply(reply)
        self._strategy.observe_exchange(sent, replies)
        if self._on_exchange is not None:
            self._on_exchange(sent, replies)
        return replies


class FedprivStrategy(Strategy):
    """Flower legacy Strategy used by the fedpriv ServerApp (see the module doc)."""

    def __init__(self, cfg: RunConfig, initial: list[np.ndarray], run_log: RunLog,
                 recorder: PrivacyRecorder, evaluate_fn: Callable[[int, list[np.ndarray]], tuple[float, float]],
                 authenticated_nodes: bool = False, canary_clients: CanaryClients | None = None) -> None:
        self.cfg = cfg
        # The empirical audit's canary clients (common.canaries.CanaryClients); None in every real run.
        self.canary_clients = canary_clients
        # Who a reply's spending is charged to (see account_of): the node id Flower authenticated
        # in a deployment; in a simulation, the partition the client declares, held to one node.
        self.authenticated_nodes = authenticated_nodes
        self._accounts: dict[str, int] = {}  # declared client id -> the node id that first declared it
        self.run_log = run_log
        self.recorder = recorder
        self.evaluate_fn = evaluate_fn
        self.dimension = int(sum(a.size for a in initial))
        self.user_noise = user_dp.noise_for(cfg, self.dimension)  # the user-level mechanism, or None
        self.inner = build_inner_strategy(cfg, ndarrays_to_parameters(initial))
        self.latest: list[np.ndarray] = [np.asarray(a) for a in initial]
        self.stopped: str | None = None
        self.round_offset = 0  # rounds done before this process (a resumed run)
        self.on_round_end: Callable[[int, list[np.ndarray]], None] | None = None  # checkpoints
        self.rounds = Rounds()  # what the server learns about each round (server.rounds)
        if canary_clients is not None:
            if not (cfg.user_dp.enabled and cfg.user_dp.noise_mode == "central") or cfg.user_dp.adaptive_clipping:
                raise FedprivError("canary clients need user-level DP with central noise and a fixed clip")
            buffer = io.BytesIO()
            np.save(buffer, np.concatenate([np.asarray(a, np.float64).ravel() for a in initial]))
            write_atomic(Path(canary_clients.sink) / "initial.npy", buffer.getvalue())

    # ---- rounds and server optimizer state (a resume) -----------------------------------
    def fedpriv_round(self, flower_round: int) -> int:
        """The run's round number of the round Flower's workflow calls ``flower_round``."""
        return flower_round + self.round_offset if flower_round > 0 else flower_round

    def message_round(self, message: Any) -> int | None:
        """The run's round of a message the workflow sent or received (its group_id)."""
        try:
            return self.fedpriv_round(int(message.metadata.group_id))
        except (TypeError, ValueError):
            return None

    def optimizer_state(self) -> dict[str, list[np.ndarray]]:
        """The server optimizer's state (FedAdam's moments) and, with adaptive clipping, the
        next round's clip, for a checkpoint."""
        state = {name: list(getattr(self.inner, name)) for name in ("m_t", "v_t")
                 if getattr(self.inner, name, None) is not None}
        if self.user_noise is not None and self.user_noise.adaptive:
            state[USER_CLIP] = [np.array([self.user_noise.clip])]
        return state

    def restore_optimizer(self, state: dict[str, list[np.ndarray]]) -> None:
        """Continue the server optimizer (and the adaptive clip) from a checkpoint (state this
        run lacks is dropped)."""
        for name, arrays in state.items():
            if name == USER_CLIP:
                if self.user_noise is not None and self.user_noise.adaptive:
                    self.user_noise.clip = float(np.asarray(arrays[0]).ravel()[0])
            elif hasattr(self.inner, name):
                setattr(self.inner, name, [np.asarray(a) for a in arrays])

    # ---- observation (called by ObservedGrid) -------------------------------------------
    def observe_reply(self, reply: Any) -> None:
        server_round = self.message_round(reply)
        if server_round is None:
            return
        node = reply.metadata.src_node_id
        if reply.has_error():
            self.rounds[server_round].drop(node, clean_reason(reply.error.reason))
            if reply.error.code in REFUSAL_CODES:
                self.recorder.record_refusal(server_round, str(node), clean_reason(reply.error.reason))
            return
        try:
            metrics = reply_metrics(reply.content)
        except TypeError as exc:  # metrics Flower's FitRes cannot hold
            self.rounds[server_round].malformed[node] = f"malformed privacy record ({exc})"
            return
        if metrics is None:
            return
        try:
            client_id = self.account_of(node, metrics)
            declared = parse_declaration(metrics)
        except (KeyError, TypeError, ValueError) as exc:
            # Spending that cannot be read cannot be accounted: the update is not used.
            self.rounds[server_round].malformed[node] = f"malformed privacy record ({exc})"
            return
        epsilon = self.recorder.record_client(server_round, client_id, declared)
        # Kept: who replied and the server's own epsilon figure (from the recorded events), never
        # anything else a client might have put in its metrics.
        seen: dict[str, Any] = {CLIENT_ID: client_id}
        if epsilon is not None:
            seen[RECORD_EPSILON] = epsilon
        self.rounds[server_round].replies[node] = seen

    def account_of(self, node: int, metrics: dict[str, Any]) -> str:
        """The identity a reply's spending is recorded under.

        In a deployment, the node id the SuperLink stamped on the reply: the node authenticated
        with its registered key, and a client id it declares is ignored, so no node can charge
        its spending to another or pre-empt another's record of prior spending. In a simulation
        the engine runs every virtual node itself and the stable identity is the partition the
        client declares (Flower's simulated node ids change from one process to the next, a
        resume included); one declared id stays with the node id that first used it, and a second
        node declaring it is refused (raises ValueError: the reply counts as malformed).
        """
        if self.authenticated_nodes:
            return str(int(node))
        declared = str(int(metrics[CLIENT_ID]))
        holder = self._accounts.setdefault(declared, node)
        if holder != node:
            raise ValueError(f"client id {declared} is already held by another node in this run")
        return declared

    def observe_exchange(self, sent: list, replies: list) -> None:
        answered = {r.metadata.src_node_id for r in replies}
        for msg in sent:
            server_round = self.message_round(msg)
            if server_round is None:
                continue
            if msg.metadata.dst_node_id not in answered:
                self.rounds[server_round].drop(msg.metadata.dst_node_id)

    # ---- Flower Strategy ----------------------------------------------------------------
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.latest)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        server_round = self.fedpriv_round(server_round)
        if self.stopped:
            return []
        federation = self.cfg.federation
        needed = max(federation.min_available_clients, federation.min_train_clients)
        # (one look at the connected nodes a round: each costs a pass over the population)
        available = wait_for_clients(client_manager.all, needed, federation.connect_timeout)
        population = len(available)
        if self.cfg.user_dp.enabled:
            expected = federation.fraction_train * population
        else:
            expected = float(self.inner.num_fit_clients(population)[0])
        try:
            self.recorder.check_user_budget(server_round, population, expected,
                                            self.user_noise.bound_before_round(population, expected)
                                            if self.user_noise else None)
        except UserBudgetExhausted as stop:
            log.warning("fedpriv: %s", stop)
            self.stopped = str(stop)
            return []
        state = self.rounds[server_round]
        state.plan(population, expected)
        if self.cfg.user_dp.enabled:
            # Poisson sampling (each client independently with probability q, from the OS
            # CSPRNG): what the user-level accounting assumes.
            draws = secagg.uniform(len(available))
            clients = [c for c, u in zip(available.values(), draws, strict=True) if u <= federation.fraction_train]
        else:
            clients = secagg.choose(available.values(), min(int(expected), population))
        secure = self.cfg.secure_aggregation
        minimum = max(federation.min_train_clients, self.cfg.secagg_shares()[0] if secure.enabled else 1)
        if len(clients) < minimum:
            reason = f"client sampling drew {len(clients)} clients, fewer than the {minimum} a round needs"
            state.failed = reason
            if self.user_noise:  # conservatively count the round: skipping depends on the draw
                self._privacy_round(server_round, len(clients), 0, self.user_noise.skipped(population, expected))
            return []
        state.sampled = {c.node_id for c in clients}
        config: dict[str, Scalar] = {SERVER_ROUND: server_round, CLIENTS_SAMPLED: len(clients),
                                     RUN_ID: self.recorder.run_id, RUN_HEAD: self.recorder.run_head()}
        if self.user_noise is not None and self.user_noise.adaptive:
            config[USER_CLIP] = self.user_noise.clip
        return [(client, FitIns(parameters, dict(config))) for client in clients]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        server_round = self.fedpriv_round(server_round)
        state = self.rounds[server_round]
        replies, malformed = state.replies, state.malformed
        errors = state.error_lines()
        secure = self.cfg.secure_aggregation.enabled
        usable = [(p, r) for p, r in results if p.node_id not in malformed]
        if not secure:  # individual updates: reject malformed ones (common.updates)
            checked = []
            for proxy, res in usable:
                try:
                    arrays = parameters_to_ndarrays(res.parameters)
                except Exception as exc:  # bytes that are not arrays at all
                    problem = f"undecodable arrays ({type(exc).__name__})"
                else:
                    problem = self._update_problem(arrays, individual=True)
                if problem:
                    errors.append(f"node {proxy.node_id}: update rejected ({problem})")
                else:
                    checked.append((proxy, res))
            usable = checked
        ok = [replies[p.node_id] for p, _ in usable if p.node_id in replies]
        needed = self.cfg.federation.min_train_clients
        if not secure and usable and len(usable) < needed:  # (SecAgg+ applies its own threshold)
            return self._fail(server_round, ok, errors,
                              f"only {len(usable)} usable update(s), fewer than federation.min_train_clients "
                              f"({needed})")
        if secure and malformed:
            # Under SecAgg+ the malformed client's update is already inside the sum.
            return self._fail(server_round, ok, errors,
                              "a client's privacy record was malformed and its masked update "
                              "cannot be separated from the sum; the round's aggregate is discarded")
        if not usable:
            return self._fail(server_round, ok, errors, "no client update could be aggregated")
        if secure:
            # SecAggPlusWorkflow gives every result the same unmasked (weighted) mean; a result's
            # own num_examples is never read (it would be the client's count in clear).
            mean = [a.astype(np.float64) for a in parameters_to_ndarrays(usable[0][1].parameters)]
        else:
            mean = aggregate([(parameters_to_ndarrays(r.parameters), r.num_examples) for _, r in usable])
            mean = [np.asarray(a, dtype=np.float64) for a in mean]
        count = None
        if self.user_noise is not None:
            mean, count = self.user_noise.split(mean)
        problem = self._update_problem(mean)
        if count is not None and (np.shape(count) != (1,) or not np.all(np.isfinite(count))):
            problem = "its clipped-or-not count is not one finite number"
        if problem:
            return self._fail(server_round, ok, errors, f"the aggregated update is malformed ({problem})")
        if self.cfg.user_dp.enabled:
            mean = self._privatize(server_round, mean, len(usable), count)
        new_global = [(g + m).astype(g.dtype) for g, m in zip(self.latest, mean, strict=True)]
        fit = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(new_global), 1, {})
        proxy = usable[0][0]
        parameters, _ = self.inner.aggregate_fit(server_round, [(proxy, fit)], [])
        if parameters is None:
            return self._fail(server_round, ok, errors, "the server strategy produced no model")
        self.latest = [np.asarray(a) for a in parameters_to_ndarrays(parameters)]
        state.aggregated = True
        self._record_train(server_round, ok, errors)
        return parameters, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []  # the server evaluates on held-out data itself

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[Any]) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """Evaluate the global model after each round (0: before the first), then let
        ``on_round_end`` checkpoint the round, aggregated or failed."""
        server_round = self.fedpriv_round(server_round)
        if server_round > 0:
            state = self.rounds[server_round]
            if not state.planned:
                return None  # the run has stopped; no round happened
            if not state.aggregated:
                self._record_failure(server_round)
        loss, accuracy = self.evaluate_fn(server_round, self.latest)
        if server_round > 0 and self.on_round_end is not None:
            self.on_round_end(server_round, self.latest)
        return loss, {"accuracy": accuracy}

    # ---- helpers ------------------------------------------------------------------------
    def _privatize(self, server_round: int, mean: list[np.ndarray], contributors: int,
                   count: np.ndarray | None = None) -> list[np.ndarray]:
        """User-level DP on the mean of ``contributors`` clipped updates (``count``: the mean of
        their clipped-or-not values, with adaptive clipping); record the round.

        The noisy sum is divided by the expected number of clients (q * population), a fixed
        denominator, as DP-FedAvg with Poisson sampling requires (McMahan et al. 2018).
        """
        state = self.rounds[server_round]
        population, expected = state.population, state.expected
        sampled = len(state.sampled)
        if self.canary_clients is not None:  # the audit's canaries join the clipped updates, before the noise
            mean, contributors = self.canary_clients.join(mean, contributors, self.cfg.federation.fraction_train,
                                                          clip_bound(self.cfg))
        release = self.user_noise.release(mean, contributors, sampled, population, expected, count=count)
        self._privacy_round(server_round, sampled, contributors, release)
        self.run_log.entry(server_round).clipping_norm = release.parameters.get("clipping_norm")
        return [t / expected for t in release.noisy_sum]

    def _privacy_round(self, server_round: int, sampled: int, contributors: int, release: user_dp.Release) -> None:
        state = self.rounds[server_round]
        population, expected = state.population, state.expected
        epsilon = self.recorder.record_user_round(
            server_round, population, expected, sampled, contributors, release.noise_multiplier,
            release.parameters, release.event, release.sampling)
        self.run_log.entry(server_round).user_epsilon = epsilon

    def _update_problem(self, arrays: list[np.ndarray], individual: bool = False) -> str | None:
        """Why an update (an individual one, as its client sent it: also its norm against the
        round's clip, under user-level DP) is malformed."""
        shapes = [a.shape for a in self.latest]
        if not individual:
            return update_problem(arrays, shapes)
        return individual_problem(self.cfg, arrays, shapes, self.user_noise.clip if self.user_noise else None)

    def _fail(self, server_round: int, ok: list[dict[str, Any]], errors: list[str],
              reason: str) -> tuple[None, dict[str, Scalar]]:
        self.rounds[server_round].failed = reason
        self._record_train(server_round, ok, errors)
        return None, {}

    def _record_train(self, server_round: int, ok: list[dict[str, Any]], errors: list[str]) -> None:
        """Record (summary.json's failures, metrics.csv) and log the round's client outcomes."""
        for error in errors:
            log.warning("fedpriv: round %d: %s", server_round, error)
        self.run_log.record_train(server_round, ok, errors)

    def _record_failure(self, server_round: int) -> None:
        state = self.rounds[server_round]
        reason = state.failed
        if reason is None:  # the SecAgg+ workflow halted before handing over an aggregate
            reason = (f"secure aggregation halted: {len(state.dropped_sampled())} of {len(state.sampled)} "
                      f"sampled clients dropped out (at most {secagg.tolerated_dropouts(self.cfg)} tolerated: "
                      f"num_shares - reconstruction_threshold)")
            # Clients that trained still spent their record-level budget (already recorded).
            self._record_train(server_round, list(state.replies.values()), state.error_lines())
        self.recorder.record_round_failure(server_round, reason)
        self.run_log.record_round_failure(server_round, reason)
        log.warning("fedpriv: round %d failed: %s", server_round, reason)
        if self.cfg.federation.on_round_failure == "stop":
            self.stopped = (f"round {server_round} failed ({reason}); the run ends here "
                            f"(federation.on_round_failure = 'stop')")
            self.recorder.stopped = {"round": server_round, "reason": self.stopped}


def clean_reason(text: str, limit: int = 300) -> str:
    """One readable line from a client error (Flower's Ray runtime wraps it in a traceback), at
    most ``limit`` characters of printable text: a client's reason goes into the run's ledger and
    report, so it can neither grow them without bound nor smuggle control characters into them."""
    text = _ANSI.sub("", str(text)[-64 * limit:])
    match = re.search(r"Message: (.+?)'?>?\s*$", text, re.S)
    if match:
        text = match.group(1)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else "unknown error"
    line = "".join(c if c.isprintable() else "?" for c in line)
    return line if len(line) <= limit else line[: limit - 3] + "..."


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
