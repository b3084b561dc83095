"""Who a node is: its name, its state directory, the key it signs its SecAgg+ keys with, and the
privacy floor it holds runs to.

A real node (``data-path`` in its node config, as ``fedpriv node join`` sets it) takes these from
its node config; a simulated one from its partition and the run's configuration.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context

from fedpriv.clients.policy import POLICY_PATH_KEY, NodePolicy, load_policy
from fedpriv.clients.secagg_guard import NodeIdentity
from fedpriv.common import rundir
from fedpriv.common.config import RunConfig
from fedpriv.common.roster import SIM_ANCHOR_PUB, SIM_NODE_SECRET, simulated_key_name


def is_real_node(context: Context) -> bool:
    return "data-path" in context.node_config


def node_name_and_state_dir(context: Context, cfg: RunConfig) -> tuple[str, Path]:
    """A node's name and state directory: a real node's (``data-path`` in its node config, as
    ``fedpriv node join`` sets it) from its node config, a simulated one's from its partition."""
    config = context.node_config
    if is_real_node(context):
        name = str(config.get("node-name") or f"node-{context.node_id}")
        root = Path(str(config["state-dir"])) if config.get("state-dir") else rundir.nodes_root(cfg)
        return name, root / name
    name = rundir.simulated_node_name(int(config.get("partition-id", -1)))
    return name, rundir.node_state_dir(cfg, name)


def node_identity(context: Context, cfg: RunConfig) -> NodeIdentity | None:
    """What this node signs its SecAgg+ keys with: a real node's authentication key and the CA
    it trusts (``auth-key``, ``ca-cert`` in its node config); a simulated node's key derived from
    the simulation's node secret, and its anchor (:func:`common.roster.simulated_federation`)."""
    config = context.node_config
    if is_real_node(context):
        if not config.get("auth-key") or not config.get("ca-cert"):
            return None
        return NodeIdentity(Path(str(config["auth-key"])), Path(str(config["ca-cert"])))
    root = rundir.nodes_root(cfg)
    return NodeIdentity(root / SIM_NODE_SECRET, root / SIM_ANCHOR_PUB,
                        simulated=simulated_key_name(context.node_id))


def node_policy(context: Context) -> NodePolicy | None:
    """The privacy floor this node holds every run to (:mod:`clients.policy`): a real node's from
    the file in its node config (``policy-path``, as ``fedpriv node join --policy`` sets it) or
    the defaults; a simulated node's only when its node config names a file."""
    path = context.node_config.get(POLICY_PATH_KEY)
    if path:
        return load_policy(Path(str(path)))
    return NodePolicy() if is_real_node(context) else None


def record_budget(context: Context, cfg: RunConfig, policy: NodePolicy | None) -> float:
    """This node's record-level budget over all runs: ``record-budget`` in its node config
    (``fedpriv node join --budget``), else its policy's, and only for a simulated node without a
    policy the run's ``privacy.record_budget``."""
    config = context.node_config
    if "record-budget" in config:
        return float(config["record-budget"])
    if policy is not None:
        return policy.budget_total
    return cfg.privacy.record_budget
