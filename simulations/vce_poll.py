"""Flower's simulation engine, its message pickup made proportional to the messages, not the population.

Flower 1.42's simulation runtime hands messages to its workers from one thread,
``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``, which asks the LinkState for
each virtual node in turn, every 0.1 s, whether a message waits for it. Each question walks every
stored message under the LinkState's lock. With 100,000 virtual nodes that thread is never idle:
it takes a core and the lock the ServerApp needs to send and collect its messages, and a round
that takes 1.5 s with 1,000 nodes takes about 15 s (``benchmarks/scale.py``).

:func:`add_messages_to_queue` is the one piece replaced. Each pass first reads, under the
LinkState's lock, which nodes have an undelivered message, then asks Flower's own
``get_message_ins`` (``limit=1``, as Flower does) for those nodes only, so delivery, expiry and
the ``delivered_at`` stamp stay Flower's. A LinkState without the in-memory store (another
backend) is polled the way Flower polls it. ``tests/test_vce_poll.py`` checks that the two hand
out the same messages from the same LinkState.

A pass also starts as soon as the ServerApp stores a message (the LinkState's
``store_message_ins`` is wrapped to say so), rather than at the next 0.1 s tick: every exchange
(one a round without SecAgg+, four with it) would otherwise wait 50 ms on average before its
first message leaves. The tick stays, for messages stored any other way.

To drop this module: when Flower's own loop no longer polls node by node, delete it and the
:func:`install` call in ``simulations/run.py``.
"""

from __future__ import annotations

import threading
from queue import Queue
from typing import Any

from flwr.server.superlink.fleet.vce import vce_api

POLL_S = 0.1  # Flower's own interval between passes
FLOWERS = vce_api.add_messages_to_queue  # Flower's own (what tests compare with)


def waiting_nodes(state: Any) -> set[int] | None:
    """The node ids that an undelivered message is addressed to, or None if ``state`` keeps no
    in-memory message store (then every node has to be asked)."""
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return None
    with lock:
        return {m.metadata.dst_node_id for m in store.values() if m.metadata.delivered_at == ""}


def announce_stored_messages(state: Any) -> threading.Event:
    """An event set whenever a message is stored in ``state`` through its ``store_message_ins``
    (the ServerApp's grid stores every message that way); one per LinkState, however often asked."""
    arrived = getattr(state, "_fedpriv_arrived", None)
    if arrived is None:
        arrived = threading.Event()
        store = state.store_message_ins

        def store_message_ins(*args: Any, **kwargs: Any) -> Any:
            try:
                return store(*args, **kwargs)
            finally:
                arrived.set()

        state.store_message_ins = store_message_ins
        state._fedpriv_arrived = arrived
    return arrived


def add_messages_to_queue(state: Any, queue: Queue, nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
    """Flower's ``add_messages_to_queue`` (same arguments, same messages handed out)."""
    arrived = announce_stored_messages(state)
    while not f_stop.is_set():
        arrived.clear()  # (before the pass: a message stored during it starts the next one at once)
        waiting = waiting_nodes(state)
        nodes = nodes_mapping.keys() if waiting is None else [n for n in waiting if n in nodes_mapping]
        for node_id in nodes:
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
        arrived.wait(POLL_S)


def install() -> None:
    """Make Flower's simulation runtime use :func:`add_messages_to_queue` (idempotent)."""
    vce_api.add_messages_to_queue = add_messages_to_queue
