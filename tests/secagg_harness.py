"""Run a small SecAgg+ simulation and capture both sides of the masking (for the server-view test).

``python -m tests.secagg_harness OUT_DIR [section.key=value ...]`` writes, besides the run
directory ``OUT_DIR/run``:

- ``OUT_DIR/server-view.npz``: every masked vector the server process received in the SecAgg+
  "collect masked vectors" stage (``masked_<client>``, flattened), the global model the server
  sent (``global``), and each client's weight (``weight_<client>``);
- ``OUT_DIR/updates/update-<client>.npz``: what each client really sent into SecAgg+ (its
  update before masking), written by a mod inside secure aggregation on the client.

With ``--deviate`` first, the server deviates from the protocol in every round: its unmask requests
list one node (the lowest id) as both surviving and dropped, asking for both of its secrets.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

CAPTURE_ENV = "FEDPRIV_TEST_CAPTURE"


def capture_mod(msg, context, call_next):
    """Inner client mod: save the plain update this client hands to SecAgg+."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import parameters_to_ndarrays

    reply = call_next(msg, context)
    if not reply.has_error() and "fitres.parameters" in reply.content.array_records:
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        arrays = parameters_to_ndarrays(fitres.parameters)
        flat = np.concatenate([a.ravel() for a in arrays]).astype(np.float64)
        target = Path(os.environ[CAPTURE_ENV]) / f"update-{int(context.node_config['partition-id'])}.npz"
        np.savez(target, update=flat, weight=fitres.num_examples)
    return reply


def deviate_in_unmask():
    """Make the server list one node as surviving and dropped in its neighbours' unmask requests
    (the server process's grid, just before the requests leave); returns what undoes it."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    from fedpriv.server.strategy import ObservedGrid

    honest = ObservedGrid.send_and_receive

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        unmask = [m for m in messages if m.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE)
                  == Stage.UNMASK]
        if unmask:
            victim = min(m.metadata.dst_node_id for m in unmask)
            for msg in unmask:
                configs = msg.content.config_records[RECORD_KEY_CONFIGS]
                if msg.metadata.dst_node_id != victim and victim in configs[Key.ACTIVE_NODE_ID_LIST]:
                    configs[Key.DEAD_NODE_ID_LIST] = [*configs[Key.DEAD_NODE_ID_LIST], victim]
        return honest(self, messages, timeout=timeout)

    ObservedGrid.send_and_receive = send_and_receive

    def undo() -> None:
        ObservedGrid.send_and_receive = honest

    return undo


def main(argv: list[str]) -> int:
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
    from flwr.simulation import run_simulation

    from fedpriv.clients.app import make_client_app
    from fedpriv.common.config import load_config
    from fedpriv.server.app import make_server_app
    from fedpriv.common.presets import preset_layers
    from fedpriv.simulations.run import backend_config, plan, quiet_flower

    if argv[0] == "--deviate":
        undo = deviate_in_unmask()
        try:
            return main(argv[1:])
        finally:
            undo()
    out = Path(argv[0])
    updates = out / "updates"
    updates.mkdir(parents=True)
    os.environ[CAPTURE_ENV] = str(updates)  # (Ray workers inherit it)
    cfg = load_config(preset_layers("no-dp"), [f"run.out_dir={out / 'run'}", *argv[1:]])
    view: dict[str, np.ndarray] = {}

    def on_exchange(sent, replies):
        for msg in sent:
            if "fitins.parameters" in msg.content.array_records:
                fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
                view["global"] = np.concatenate([a.ravel() for a in parameters_to_ndarrays(fitins.parameters)])
        for reply in replies:
            if reply.has_error() or RECORD_KEY_CONFIGS not in reply.content.config_records:
                continue
            configs = reply.content.config_records[RECORD_KEY_CONFIGS]
            if Key.MASKED_PARAMETERS not in configs:
                continue
            fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
            client = int(fitres.metrics["client-id"])
            arrays = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
            view[f"masked_{client}"] = np.concatenate([a.ravel() for a in arrays])
            view[f"weight_{client}"] = np.array(fitres.num_examples)
            view[f"plain_arrays_{client}"] = np.array(len(fitres.parameters.tensors))  # beside the masked vector

    quiet_flower(False)
    run_plan = plan(cfg)
    run_simulation(
        server_app=make_server_app(cfg, out_dir=out / "run", on_exchange=on_exchange),
        client_app=make_client_app(cfg, inner_mods=[capture_mod]),
        num_supernodes=cfg.federation.num_clients,
        backend_config=backend_config(cfg, run_plan.gpus_per_client, False),
    )
    np.savez(out / "server-view.npz", **view)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
