"""simulations/vce_poll.py against Flower's own message pickup: the same simulation, run once with
each, hands the same messages (round, message type, virtual node) to the ClientApps."""

from __future__ import annotations

import pytest
from flwr.server.superlink.fleet.vce import vce_api

from fedpriv.simulations import vce_poll
from tests.conftest import simulate_run

pytestmark = pytest.mark.slow

# SecAgg+ (four stages) in one round of 4 clients.
SETTINGS = ["data.dataset=digits", "data.test_fraction=0.2", "model.name=mlp", "run.rounds=1",
            "federation.num_clients=4", "federation.min_available_clients=4", "client.local_epochs=1"]


def _handed_out(poller, out, monkeypatch) -> tuple[list[tuple], dict]:
    handed: list[tuple] = []

    def recording(state, queue, nodes_mapping, f_stop):
        class Recorder:
            def put(self, message):
                meta = message.metadata
                handed.append((meta.group_id, meta.message_type, nodes_mapping[meta.dst_node_id]))
                queue.put(message)
        poller(state, Recorder(), nodes_mapping, f_stop)

    monkeypatch.setattr(vce_poll, "install", lambda: setattr(vce_api, "add_messages_to_queue", recording))
    proc, summary = simulate_run(out, SETTINGS, here=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sorted(handed), summary


def test_fedprivs_pickup_hands_out_what_flowers_hands_out(tmp_path, monkeypatch):
    saved = vce_api.add_messages_to_queue
    try:
        flowers, flower_run = _handed_out(vce_poll.FLOWERS, tmp_path / "flower", monkeypatch)
        ours, our_run = _handed_out(vce_poll.add_messages_to_queue, tmp_path / "ours", monkeypatch)
    finally:
        vce_api.add_messages_to_queue = saved
    assert ours == flowers
    # every node, every SecAgg+ stage (setup, share keys, masked vectors, unmask)
    assert {p for _, _, p in ours} == {0, 1, 2, 3} and len(ours) == 4 * 4
    assert all(r["clients_trained"] == 4 for run in (flower_run, our_run) for r in run["rounds"])
