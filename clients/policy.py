"""A node's own privacy floor: what it accepts from a run, whatever the run's configuration says.

The server writes a run's configuration, so it cannot be what protects a node's data. A real node
(``fedpriv node join``) holds a :class:`NodePolicy` -- from ``--policy node-policy.toml``, or the
defaults below -- and checks every run against it before anything else happens in a round
(:func:`policy_mod`, the outermost of fedpriv's client mods): record-level DP on, with at least
its noise multiplier and at most its clip norm; SecAgg+ on with at least its share count;
user-level DP if it asks for it; at least its number of clients per round; a model it allows; a
run budget no larger than its own. A run that falls short is refused with the reason (error code
:data:`common.protocol.POLICY_REFUSED_CODE`, which the server records as a refusal in the run's
ledger) and the refusal is recorded in the node's own signed ledger. The node's record-level
budget, per run and in total, is the policy's, never the run's: :mod:`clients.app` enforces it
with the node's budget guard.

The file is TOML; every key is optional and unknown keys are errors::

    [record_level]
    required = true              # refuse runs without record-level DP (DP-SGD)
    min_noise_multiplier = 0.5   # effective: halved with microbatches, as the accounting does
    max_l2_norm_clip = 0.0       # 0: any
    budget_total = 10.0          # epsilon over every run this node ever trains in
    budget_per_run = 0.0         # epsilon within one run (0: only the total applies)

    [secure_aggregation]
    required = true
    min_shares = 3               # never below fedpriv's floor of 3 (common.config)

    [user_level]
    required = false

    [federation]
    min_clients_per_round = 2    # the fewest updates a round may aggregate

    [model]
    allowed = ["cnn", "mlp"]

The data schema is the node's own file, checked against the run's dataset (input shape, labels)
before it trains (:func:`common.data.load_node_data`).

Simulated nodes have no policy unless their node config names one (``policy-path``): they are the
simulation's own processes, configured by the same person as the run.
"""

from __future__ import annotations

import functools
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedpriv.common.accounting import effective_noise_multiplier
from fedpriv.common.config import SECAGG_MIN_SHARES, RunConfig
from fedpriv.common.errors import ConfigError
from fedpriv.common.models import resolve_model_name

POLICY_PATH_KEY = "policy-path"  # node config: the node's policy file
MODELS = ("cnn", "mlp")


@dataclass(frozen=True)
class NodePolicy:
    require_dp: bool = True
    min_noise_multiplier: float = 0.5
    max_l2_norm_clip: float = 0.0
    budget_total: float = 10.0
    budget_per_run: float = 0.0
    require_secagg: bool = True
    min_shares: int = SECAGG_MIN_SHARES
    require_user_dp: bool = False
    min_clients_per_round: int = 2
    allowed_models: tuple[str, ...] = MODELS

    def problems(self, cfg: RunConfig, input_shape: tuple[int, ...] | None = None,
                 node_budget: float | None = None) -> list[str]:
        """Every way the run configuration ``cfg`` falls short of this policy (empty: accepted).
        ``node_budget``: the node's total budget when set apart from the policy (``--budget``)."""
        total = node_budget if node_budget else self.budget_total
        found = []
        dp = cfg.dp
        if self.require_dp and not dp.enabled:
            found.append("record-level DP is off (dp.enabled = false); this node requires it")
        if dp.enabled:
            z = effective_noise_multiplier(dp.noise_multiplier, dp.microbatches, cfg.client.batch_size)
            if z < self.min_noise_multiplier:
                found.append(f"the record-level noise multiplier is {z:g}, below this node's minimum of "
                             f"{self.min_noise_multiplier:g}")
            if self.max_l2_norm_clip and dp.l2_norm_clip > self.max_l2_norm_clip:
                found.append(f"dp.l2_norm_clip is {dp.l2_norm_clip:g}, above this node's maximum of "
                             f"{self.max_l2_norm_clip:g}")
            run_budget = cfg.privacy.record_budget
            if not run_budget or run_budget > total:
                shown = f"{run_budget:g}" if run_budget else "unlimited (0)"
                found.append(f"the run's record-level budget is {shown}, above this node's budget of {total:g}")
        secure = cfg.secure_aggregation
        shares, threshold = cfg.secagg_shares() if secure.enabled else (0, 0)
        if self.require_secagg and not secure.enabled:
            found.append("SecAgg+ is off (secure_aggregation.enabled = false); this node requires it")
        elif secure.enabled and shares < self.min_shares:
            found.append(f"SecAgg+ uses {shares} shares, fewer than this node's minimum of {self.min_shares}")
        if self.require_user_dp and not cfg.user_dp.enabled:
            found.append("user-level DP is off (user_dp.enabled = false); this node requires it")
        fewest = max(cfg.federation.min_train_clients, threshold)
        if fewest < self.min_clients_per_round:
            found.append(f"a round may aggregate as few as {fewest} client(s), fewer than this node's "
                         f"minimum of {self.min_clients_per_round}")
        model = cfg.model.name
        if input_shape is not None:
            model = resolve_model_name(cfg.model, input_shape)
        if model not in self.allowed_models and not (model == "auto" and input_shape is None):
            found.append(f"model {model!r} is not one this node allows ({', '.join(self.allowed_models)})")
        return found


_SECTIONS: dict[str, dict[str, str]] = {
    "record_level": {"required": "require_dp", "min_noise_multiplier": "min_noise_multiplier",
                     "max_l2_norm_clip": "max_l2_norm_clip", "budget_total": "budget_total",
                     "budget_per_run": "budget_per_run"},
    "secure_aggregation": {"required": "require_secagg", "min_shares": "min_shares"},
    "user_level": {"required": "require_user_dp"},
    "federation": {"min_clients_per_round": "min_clients_per_round"},
    "model": {"allowed": "allowed_models"},
}


def _typed(name: str, value: Any, where: str) -> Any:
    kind = {f.name: f.type for f in fields(NodePolicy)}[name]
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where} must be a whole number >= 0, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{where} must be a finite number >= 0, got {value!r}")
        return float(value)
    if not isinstance(value, list) or not value or any(v not in MODELS for v in value):
        raise ConfigError(f"{where} must be a non-empty list of {', '.join(MODELS)}, got {value!r}")
    return tuple(value)


def policy_from_mapping(raw: dict[str, Any], source: str = "the node policy") -> NodePolicy:
    """A policy from parsed TOML; any unknown or ill-typed key is a one-line ConfigError."""
    values: dict[str, Any] = {}
    for section, table in raw.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(_SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {section} must be a table ([{section}])")
        for key, value in table.items():
            if key not in _SECTIONS[section]:
                raise ConfigError(f"{source}: unknown key {section}.{key} (known: "
                                  f"{', '.join(_SECTIONS[section])})")
            name = _SECTIONS[section][key]
            values[name] = _typed(name, value, f"{source}: {section}.{key}")
    policy = NodePolicy(**values)
    if policy.min_shares < SECAGG_MIN_SHARES:
        raise ConfigError(f"{source}: secure_aggregation.min_shares cannot be below fedpriv's floor of "
                          f"{SECAGG_MIN_SHARES}")
    if not policy.budget_total > 0:
        raise ConfigError(f"{source}: record_level.budget_total must be a positive epsilon")
    return policy


def load_policy(path: Path | None) -> NodePolicy:
    """The policy in ``path`` (TOML), or the defaults when ``path`` is None. Read once per version
    of the file (its size and modification time), although every mod of a round asks for it."""
    if path is None:
        return NodePolicy()
    try:
        stat = Path(path).stat()
    except OSError as exc:
        raise ConfigError(f"cannot read the node policy {path} ({exc.strerror})") from None
    return _load_policy(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _load_policy(path: str, mtime_ns: int, size: int) -> NodePolicy:
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the node policy {path} ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the node policy {path} is not valid TOML ({exc})") from None
    return policy_from_mapping(raw, f"node policy {path}")
