"""Flower's SecAgg+ protocol run in one process, for attack tests.

The server side is Flower's own ``SecAggPlusWorkflow`` (stock, or fedpriv's subclass); each
node runs Flower's ``secaggplus_mod`` (stock) or fedpriv's SecAgg+ mod around a train step that
returns a fixed update. :class:`MemoryGrid` delivers messages directly; its ``tamper`` hook
rewrites what the server sends and sees what comes back, which is how a test plays a server that
deviates from the protocol.
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import Strategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key as WorkflowKey

from tests.conftest import task_identity

RUN_ID = 77


@dataclass
class Node:
    node_id: int
    context: Context
    handler: Callable[[Message, Context], Message]
    update: list[np.ndarray]


class MemoryGrid:
    """A Grid whose nodes answer in-process; ``tamper(msg) -> msg`` sees every outgoing message
    and ``observe(reply)`` every reply."""

    def __init__(self, nodes: dict[int, Node], tamper: Callable[[Message], Message] | None = None,
                 observe: Callable[[Message], None] | None = None) -> None:
        self.nodes, self.tamper, self.observe = nodes, tamper, observe
        self.refusals: dict[int, list[str]] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg = copy.deepcopy(msg)  # each node gets its own copy, as over the network
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            msg.metadata.__dict__["_run_id"] = RUN_ID
            if self.tamper is not None:
                msg = self.tamper(msg)
            node = self.nodes[msg.metadata.dst_node_id]
            try:
                reply = node.handler(msg, node.context)
            except Exception as exc:  # Flower turns a raising ClientApp into an error reply
                from flwr.app import Error
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            if reply.has_error():
                self.refusals.setdefault(node.node_id, []).append(reply.error.reason)
            if self.observe is not None:
                self.observe(reply)
            replies.append(reply)
        return replies


class _Proxy:
    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.cid = str(node_id)


@dataclass
class CaptureStrategy(Strategy):
    """Sends the model to every node; keeps the aggregate SecAgg+ unmasks."""

    node_ids: list[int]
    model: list[np.ndarray]
    aggregate: list[np.ndarray] | None = None
    failures: list[Any] = field(default_factory=list)

    def initialize_parameters(self, client_manager):
        return ndarrays_to_parameters(self.model)

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Proxy(n), FitIns(parameters, {})) for n in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):
        self.failures = list(failures)
        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def configure_evaluate(self, *args):
        return []

    def aggregate_evaluate(self, *args):
        return None, {}

    def evaluate(self, *args):
        return None


def train_step(update: list[np.ndarray] | Callable[[], list[np.ndarray]]):
    """A ClientApp step that replies with ``update`` (or what calling it returns; weight 1)."""

    def step(msg: Message, context: Context) -> Message:
        arrays = update() if callable(update) else update
        fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(arrays), 1, {})
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    return step


def make_nodes(updates: list, mod, run_config: dict | None = None) -> dict[int, Node]:
    """One node per update (arrays, or a function that trains and returns them); ``mod(msg, ctx,
    call_next)`` is the SecAgg+ mod they run."""
    nodes = {}
    for i, update in enumerate(updates):
        node_id = 1000 + i
        context = Context(run_id=RUN_ID, node_id=node_id,
                          node_config={"partition-id": i, "num-partitions": len(updates)},
                          state=RecordDict(), run_config=dict(run_config or {}))
        step = train_step(update)
        nodes[node_id] = Node(node_id, context, lambda m, c, s=step: mod(m, c, s), update)
    return nodes


def run_round(workflow, nodes: dict[int, Node], model: list[np.ndarray], tamper=None, observe=None,
              server_round: int = 1) -> tuple[CaptureStrategy, MemoryGrid]:
    """One SecAgg+ round of ``workflow`` over ``nodes``; the strategy holds the aggregate."""
    strategy = CaptureStrategy(sorted(nodes), model)
    grid = MemoryGrid(nodes, tamper, observe)
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                        MAIN_PARAMS_RECORD: compat.parameters_to_arrayrecord(ndarrays_to_parameters(model), True)})
    context = Context(run_id=RUN_ID, node_id=0, node_config={}, state=state, run_config={})
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
    with task_identity(run_id=RUN_ID, node_id=1):  # the server's
        workflow(grid, legacy)
    return strategy, grid


def stock_mod(msg, context, call_next):
    return secaggplus_mod(msg, context, call_next)


