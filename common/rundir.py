"""The layout of a run directory: every file a run writes, named in one place."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.config import RunConfig

SUMMARY = "summary.json"  # final results, per-round metrics, privacy, the full configuration
METRICS = "metrics.csv"  # one row per round
PLOT = "progress.png"  # accuracy and record-level epsilon per round
MODEL = "model.npz"  # final global model weights, arrays in layer order

DEFAULT_RUNS_DIR = "runs"
NODES_DIR = "nodes"  # node state directories (signed ledgers, simulated nodes' keys)


def nodes_root(cfg: RunConfig) -> Path:
    """Where nodes keep their state when their node config names no state directory:
    ``client.state_dir``, else ``<run.out_dir>/nodes``, else ``$FEDPRIV_HOME/nodes``."""
    if cfg.client.state_dir:
        return Path(cfg.client.state_dir)
    if cfg.run.out_dir:
        return Path(cfg.run.out_dir) / NODES_DIR
    return home_nodes_root()


def home_nodes_root() -> Path:
    """``$FEDPRIV_HOME/nodes``: node state outside any run directory (and fedpriv node join's
    default)."""
    return Path(os.environ.get("FEDPRIV_HOME", Path.home() / ".fedpriv")) / NODES_DIR


def simulated_node_name(partition: int) -> str:
    return f"sim-{partition}"


def node_state_dir(cfg: RunConfig, name: str) -> Path:
    """The state directory of node ``name`` (see the client.state_dir help)."""
    return nodes_root(cfg) / name


def default_run_dir(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """``runs/<name>-<UTC timestamp>``, under ``$FEDPRIV_RUNS_DIR`` when set."""
    base = Path(root or os.environ.get("FEDPRIV_RUNS_DIR", DEFAULT_RUNS_DIR))
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return base / f"{name}-{stamp}"


def json_safe(value: Any) -> Any:
    """Replace non-finite floats (JSON has none) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # (platforms that cannot open a directory)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)  # the rename itself survives a power loss
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_private(path: Path, data: bytes) -> None:
    """Create ``path`` (owner-only, 0600) holding ``data``, fsynced; FileExistsError if it is
    already there (never overwrites, even when another process creates it meanwhile)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_directory(path.parent)


def write_json(path: Path, payload: Any) -> None:
    write_atomic(path, (json.dumps(json_safe(payload), indent=2, sort_keys=False) + "\n").encode())
