"""Flower's SecAgg+ server workflow, with fedpriv's mask generator and the federation's roster.

:class:`SecAggPlusWorkflow` is Flower's own; this subclass changes two things and nothing of the
protocol's flow:

- masks are expanded with fedpriv's generator (:func:`common.secagg_masks.install`, the same
  replacement the nodes make), and the setup message announces it
  (:data:`common.secagg_masks.GENERATOR_KEY`), so a node can refuse a server that would use
  Flower 1.42's brute-forceable one;
- the setup message carries the federation's signed node roster
  (:data:`common.roster.ROSTER_KEY`), against which nodes verify each other's signed public keys
  (the server relays them and cannot forge them).

Pairs with :mod:`clients.secagg_guard` on the nodes, which checks both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.workflow import SecAggPlusWorkflow

from fedpriv.common import roster as rosters
from fedpriv.common import rundir, secagg_masks
from fedpriv.common.config import RunConfig
from fedpriv.common.errors import FedprivError


def federation_roster(cfg: RunConfig) -> bytes:
    """The signed roster this server sends: ``$FEDPRIV_ROSTER`` in a deployment (``fedpriv server
    start`` writes it), else the simulated federation of the run's virtual nodes."""
    path = os.environ.get(rosters.ROSTER_ENV)
    if path:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise FedprivError(f"cannot read the node roster {path} ({exc.strerror})") from None
    names = [rundir.simulated_node_name(i) for i in range(cfg.federation.num_clients)]
    return rosters.simulated_federation(rundir.nodes_root(cfg), names)


class _AnnouncingGrid:
    """Adds the generator and the roster to the setup messages the workflow sends."""

    def __init__(self, grid: Any, roster: bytes) -> None:
        self._grid, self._roster = grid, roster

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
        messages = list(messages)
        for msg in messages:
            configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            if configs is not None and configs.get(Key.STAGE) == Stage.SETUP:
                configs[secagg_masks.GENERATOR_KEY] = secagg_masks.GENERATOR
                configs[rosters.ROSTER_KEY] = self._roster
        return self._grid.send_and_receive(messages, timeout=timeout)


class FedprivSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAggPlusWorkflow with fedpriv's generator and roster (see the module doc)."""

    def __init__(self, roster: bytes, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        secagg_masks.install()
        self.roster = roster

    def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
        return super().setup_stage(_AnnouncingGrid(grid, self.roster), context, state)
