"""Where fedpriv keeps its files, resolved in one place: the layout of a run directory, the
fedpriv home (``$FEDPRIV_HOME``) with its key directory and node state, and the layout of a
server's state directory (``fedpriv server start --state``).

``$FEDPRIV_HOME`` unset or empty means ``~/.fedpriv``: an empty value never means the current
directory. Atomic and private file IO lives in :mod:`common.fileio`.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from fedpriv.common.config import RunConfig

# ---- a run directory ---------------------------------------------------------------------------
SUMMARY = "summary.json"  # final results, per-round metrics, privacy, the full configuration
METRICS = "metrics.csv"  # one row per round
PLOT = "progress.png"  # accuracy and record-level epsilon per round
MODEL = "model.sealed"  # final global model weights, arrays in layer order, sealed (common.checkpoint)
CHECKPOINT = "checkpoint.fpck"  # the latest round's sealed state, for a resume (server.resume)

DEFAULT_RUNS_DIR = "runs"
RUNS_DIR_ENV = "FEDPRIV_RUNS_DIR"
NODES_DIR = "nodes"  # node state directories (signed ledgers, simulated nodes' keys)
REVIEWS_DIR = "reviews"  # <run, server state or node state>/reviews/<UTC time>/: fedpriv review's reports

# ---- a node's state directory (<state>/<node name>) -------------------------------------------
NODE_KEY = "node.key"  # the key that signs the node's own ledger
NODE_LOCK = ".lock"  # held while a process of the node writes its ledger
TRAINING_LOG = "training.jsonl"  # the node's own per-round training figures, never sent
NODE_FLWR_HOME = "flwr"  # fedpriv node join: Flower's home for the node's processes (the apps it installs)

# ---- the fedpriv home ----------------------------------------------------------------------------
HOME_ENV = "FEDPRIV_HOME"
DEFAULT_HOME = ".fedpriv"  # under the user's home directory
KEYS_DIR = "keys"  # $FEDPRIV_HOME/keys: keys fedpriv simulate creates on first use
LEDGER_SIGNING_KEY = "ledger-signing.key"
LEDGER_KEY_ENV = "FEDPRIV_LEDGER_KEY"  # the server's ledger-signing key, where one is given
CHECKPOINT_KEY = "checkpoint.key"

# ---- a server's state directory (fedpriv server start --state) ---------------------------------
STATE_DATABASE = "superlink.db"
STATE_RUNS = "runs"
STATE_FLWR_HOME = "flwr"
STATE_KEYS_LINK = "keys"  # STATE/keys: the key directory fedpriv server start was given
STATE_OPERATORS = "operators.json"  # STATE/operators.json: the operators' port and its CA


def state_of_run(run_dir: Path) -> Path:
    """The server state directory of a run that lives in ``STATE/runs/RUN`` (``fedpriv server
    start --state``): callers check that what they look for there exists, since a run directory
    elsewhere has no state around it."""
    return Path(run_dir).resolve().parent.parent


def fedpriv_home(env: Mapping[str, str] | None = None) -> Path:
    """``$FEDPRIV_HOME``; unset or empty, ``~/.fedpriv``."""
    env = os.environ if env is None else env
    value = env.get(HOME_ENV, "")
    return Path(value) if value else Path.home() / DEFAULT_HOME


def home_keys_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$FEDPRIV_HOME/keys``: the keys fedpriv simulate makes on first use (never in a run
    directory)."""
    return fedpriv_home(env) / KEYS_DIR


def ledger_signing_key_path(env: Mapping[str, str] | None = None) -> Path:
    """The server's ledger-signing key: ``$FEDPRIV_LEDGER_KEY``, else
    ``$FEDPRIV_HOME/keys/ledger-signing.key``."""
    env = os.environ if env is None else env
    return Path(env[LEDGER_KEY_ENV]) if env.get(LEDGER_KEY_ENV) else home_keys_dir(env) / LEDGER_SIGNING_KEY


def default_checkpoint_key_path(env: Mapping[str, str] | None = None) -> Path:
    """Where simulations keep their checkpoint key: ``$FEDPRIV_HOME/keys/checkpoint.key``
    (beside the ledger-signing key, never in a run directory)."""
    return home_keys_dir(env) / CHECKPOINT_KEY


def home_nodes_root(env: Mapping[str, str] | None = None) -> Path:
    """``$FEDPRIV_HOME/nodes``: node state outside any run directory (and fedpriv node join's
    default)."""
    return fedpriv_home(env) / NODES_DIR


def nodes_root(cfg: RunConfig) -> Path:
    """Where nodes keep their state when their node config names no state directory:
    ``client.state_dir``, else ``<run.out_dir>/nodes``, else ``$FEDPRIV_HOME/nodes``."""
    if cfg.client.state_dir:
        return Path(cfg.client.state_dir)
    if cfg.run.out_dir:
        return Path(cfg.run.out_dir) / NODES_DIR
    return home_nodes_root()


def simulated_node_name(partition: int | str) -> str:
    return f"sim-{partition}"


def node_state_dir(cfg: RunConfig, name: str) -> Path:
    """The state directory of node ``name`` (see the client.state_dir help)."""
    return nodes_root(cfg) / name


def default_run_dir(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """``runs/<name>-<UTC timestamp>``, under ``$FEDPRIV_RUNS_DIR`` when set."""
    base = Path(root or os.environ.get(RUNS_DIR_ENV) or DEFAULT_RUNS_DIR)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return base / f"{name}-{stamp}"


