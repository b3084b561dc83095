"""Run a small simulation and capture every reply the server process receives (for the leakage test).

``python -m tests.leakage_harness OUT_DIR [section.key=value ...]`` runs the quickstart preset
with the given settings, its run directory at ``OUT_DIR/run``, and writes:

- ``OUT_DIR/replies.json``: one object per reply the server received, at every stage (SecAgg+
  setup, key sharing, masked vectors, unmasking, or a plain train reply): its round (group id),
  source node, whether it is an error, and every ConfigRecord, MetricRecord and ArrayRecord it
  carries, each entry's value as it arrived (numbers, strings, lists) except bytes, which are
  written to ``OUT_DIR/blobs/<i>.bin`` and stand as ``{"blob": i, "len": n}``;
- the nodes' own training logs are in ``OUT_DIR/run/nodes/sim-<i>/training.jsonl``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


def _plain(value: Any, blobs: Path, counter: list[int]) -> Any:
    """A JSON-able copy of a record value; bytes go to a blob file."""
    if isinstance(value, (bytes, bytearray)):
        index = counter[0]
        counter[0] += 1
        (blobs / f"{index}.bin").write_bytes(bytes(value))
        return {"blob": index, "len": len(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v, blobs, counter) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return {"type": type(value).__name__, "repr": repr(value)[:200]}


def main(argv: list[str]) -> int:
    from flwr.simulation import run_simulation

    from fedpriv.clients.app import make_client_app
    from fedpriv.common.config import load_config
    from fedpriv.server.app import make_server_app
    from fedpriv.common.presets import preset_layers
    from fedpriv.simulations.run import backend_config, plan, quiet_flower

    out = Path(argv[0])
    blobs = out / "blobs"
    blobs.mkdir(parents=True)
    cfg = load_config(preset_layers("quickstart"), [f"run.out_dir={out / 'run'}", *argv[1:]])
    captured: list[dict[str, Any]] = []
    counter = [0]

    def on_exchange(sent, replies):
        for reply in replies:
            entry: dict[str, Any] = {"round": reply.metadata.group_id, "node": reply.metadata.src_node_id,
                                     "error": reply.has_error(), "records": {}}
            if reply.has_error():
                entry["reason"] = str(reply.error.reason)
            else:
                content = reply.content
                for kind in ("config_records", "metric_records"):
                    entry["records"][kind] = {
                        name: {str(k): _plain(v, blobs, counter) for k, v in record.items()}
                        for name, record in getattr(content, kind).items()
                    }
                entry["records"]["array_records"] = {
                    name: {str(k): {"shape": list(a.shape), "blob": _plain(a.data, blobs, counter)}
                           for k, a in record.items()}
                    for name, record in content.array_records.items()
                }
            captured.append(entry)

    quiet_flower(False)
    run_plan = plan(cfg)
    run_simulation(
        server_app=make_server_app(cfg, out_dir=out / "run", on_exchange=on_exchange),
        client_app=make_client_app(cfg),
        num_supernodes=cfg.federation.num_clients,
        backend_config=backend_config(cfg, run_plan.gpus_per_client, False),
    )
    (out / "replies.json").write_text(json.dumps(captured))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
