"""Flower's SecAgg+ server workflow, with fedpriv's mask generator and the federation's roster.

:class:`SecAggPlusWorkflow` is Flower's own; this subclass changes three things and nothing of the
protocol's messages:

- masks are expanded with fedpriv's generator (:func:`common.secagg_masks.install`, the same
  replacement the nodes make), and the setup message announces it
  (:data:`common.secagg_masks.GENERATOR_KEY`), so a node can refuse a server that would use
  Flower 1.42's brute-forceable one;
- the setup message carries the federation's signed node roster
  (:data:`common.roster.ROSTER_KEY`; in a simulation, that of the round's virtual nodes), against
  which nodes verify each other's signed public keys (the server relays them and cannot forge
  them);
- a node that drops before its key shares reach its neighbours (at setup or at key sharing) is
  no longer counted among the round's dropped nodes. It added no mask to anyone's vector and
  left no share with anyone, but Flower 1.42 still asks its neighbours for its key shares at
  unmasking, which nobody holds, and the whole round fails
  (tests/test_secagg_early_dropouts.py shows both). When the masked vectors are collected, this
  workflow narrows the round to the nodes whose shares were handed on
  (:meth:`FedprivSecAggPlusWorkflow.collect_masked_vectors_stage`). Drop the override once
  Flower's own workflow completes such a round (the stock test there then fails).

Pairs with :mod:`clients.secagg_guard` on the nodes, which checks the first two.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.workflow import SecAggPlusWorkflow

from fedpriv.common import roster as rosters
from fedpriv.common import rundir, secagg_masks
from fedpriv.common.config import RunConfig
from fedpriv.common.errors import FedprivError


RosterFor = Callable[[list[int]], bytes]  # the node ids of a round's setup -> the roster it carries


def federation_roster(cfg: RunConfig) -> RosterFor:
    """The signed roster this server sends with a round's setup: in a deployment,
    ``$FEDPRIV_ROSTER`` (``fedpriv server start`` writes it, signed by the CA), the same for every
    round; in a simulation, the roster of the round's virtual nodes, signed by the simulation's
    anchor (:func:`common.roster.simulated_federation`)."""
    path = os.environ.get(rosters.ROSTER_ENV)
    if path:
        try:
            blob = Path(path).read_bytes()
        except OSError as exc:
            raise FedprivError(f"cannot read the node roster {path} ({exc.strerror})") from None
        return lambda node_ids: blob
    return rosters.simulated_federation(rundir.nodes_root(cfg))


class _AnnouncingGrid:
    """Adds the generator and the roster to the setup messages the workflow sends."""

    def __init__(self, grid: Any, roster_for: RosterFor) -> None:
        self._grid, self._roster_for = grid, roster_for

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
        messages = list(messages)
        setups = [msg for msg in messages if (configs := msg.content.config_records.get(RECORD_KEY_CONFIGS))
                  is not None and configs.get(Key.STAGE) == Stage.SETUP]
        if setups:
            roster = self._roster_for(sorted({msg.metadata.dst_node_id for msg in setups}))
            for msg in setups:
                configs = msg.content.config_records[RECORD_KEY_CONFIGS]
                configs[secagg_masks.GENERATOR_KEY] = secagg_masks.GENERATOR
                configs[rosters.ROSTER_KEY] = roster
        return self._grid.send_and_receive(messages, timeout=timeout)


class FedprivSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAggPlusWorkflow with fedpriv's generator and roster (see the module doc)."""

    def __init__(self, roster: RosterFor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        secagg_masks.install()
        self.roster = roster

    def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
        return super().setup_stage(_AnnouncingGrid(grid, self.roster), context, state)

    def collect_masked_vectors_stage(self, grid: Any, context: Any, state: Any) -> bool:
        """Flower's stage, on the round narrowed to the nodes that survived key sharing: only
        their key shares reached their neighbours, so only they can be unmasked or, if they drop
        now, have their pairwise masks removed (see the module doc)."""
        shared = set(state.active_node_ids)
        state.sampled_node_ids = shared
        state.nid_to_neighbours = {nid: neighbours & shared for nid, neighbours in state.nid_to_neighbours.items()
                                   if nid in shared}
        return super().collect_masked_vectors_stage(grid, context, state)
