"""Configuration resolution: what a preset, a file, ``--set`` overrides and ``--resume`` mean.

Every command that takes a configuration resolves it here, so ``fedpriv simulate``, ``fedpriv
server run``, ``fedpriv node join`` and ``fedpriv config`` agree on it:

- a new run: the preset (``--preset``, or the file's ``extends``, or ``quickstart``), then the
  file (``--config``), then each ``--set KEY=VALUE`` in order;
- ``--resume RUN_DIR``: the configuration the run last ran with, read from its verified ledger
  (its latest ``run_start`` or ``run_resume`` entry), then the file and the overrides, with
  ``run.resume`` on and ``run.out_dir`` set to the run directory. No preset applies: a file that
  extends one is refused. A resume may only tighten a budget the run has had in force
  (:func:`check_budgets`); settings that decide what each client holds are checked where the
  checkpoint is opened (``server.resume.check_settings``).

The run's history used here (verified entries, recorded configuration, budgets in force) is the
ledger's; this module only reads it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fedpriv.common.config import RunConfig, load_config, read_toml, unflatten
from fedpriv.common.errors import FedprivError
from fedpriv.common.ledger import LEDGER, verify_ledger
from fedpriv.common.presets import DEFAULT_PRESET, preset_layers
from fedpriv.common.replay import LedgerState, replay


def resolve_config(preset: str | None, config_file: str | None, overrides: list[str],
                   resume: Path | None = None) -> RunConfig:
    """The validated configuration of a new run, or (``resume``) of the run continued in place."""
    if resume is not None:
        if preset:
            raise FedprivError("--resume continues RUN_DIR with its recorded configuration; drop --preset")
        return _resume_config(resume, config_file, overrides)
    layers = []
    file_layer = read_toml(config_file) if config_file else None
    base = preset
    if file_layer is not None and "extends" in file_layer:
        extends = file_layer.pop("extends")
        if preset and preset != extends:
            raise FedprivError(f"--preset {preset} conflicts with extends = '{extends}' in {config_file}")
        base = str(extends)
    layers += preset_layers(base or DEFAULT_PRESET)
    if file_layer is not None:
        layers.append(file_layer)
    return load_config(layers, overrides)


def _resume_config(run_dir: Path, config_file: str | None, overrides: list[str]) -> RunConfig:
    if not run_dir.is_dir():
        raise FedprivError(f"no run to resume: {run_dir} is not a directory")
    state = replay(verified_entries(run_dir))
    layers = [unflatten(recorded_config(state))]
    if config_file:
        file_layer = read_toml(config_file)
        if "extends" in file_layer:
            raise FedprivError(f"{config_file} extends a preset; with --resume the base is the run's "
                               f"own configuration")
        layers.append(file_layer)
    cfg = load_config(layers, overrides)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume=True, out_dir=str(run_dir.resolve())))
    cfg.validate()
    check_budgets(state, cfg)  # before anything starts: a resume may only tighten a budget
    return cfg


def verified_entries(run_dir: Path) -> list[dict[str, Any]]:
    """The run's ledger entries, verified against ``ledger.pub`` beside it."""
    if not (run_dir / LEDGER).is_file():
        raise FedprivError(f"no run to resume in {run_dir} (no {LEDGER})")
    report = verify_ledger(run_dir, crash_tail=True)  # what a killed writer left: repaired on reopening
    if not report.ok:
        raise FedprivError(f"cannot resume {run_dir}: {report.failures[0]}")
    return report.entries


def ledger_state(entries: list[dict[str, Any]] | LedgerState) -> LedgerState:
    """The replay of ``entries`` (or ``entries`` itself, already replayed)."""
    return entries if isinstance(entries, LedgerState) else replay(entries)


def recorded_config(entries: list[dict[str, Any]] | LedgerState) -> dict[str, Any]:
    """The configuration the run last ran with (its latest run_start or run_resume), flat."""
    config = ledger_state(entries).config
    if config is None:
        raise FedprivError("the run's ledger records no configuration")
    return dict(config)


def budgets_in_force(entries: list[dict[str, Any]] | LedgerState) -> dict[str, float | None]:
    """Per budget (:data:`common.replay.BUDGETS`), the strictest value any run_start or
    run_resume of the run put in force (None: never limited; 0 or absent in an entry means no
    limit). Budgets a resume may only tighten: every value ever in force stays in force."""
    return ledger_state(entries).budgets_in_force()


def check_budgets(entries: list[dict[str, Any]] | LedgerState, cfg: RunConfig) -> None:
    """Refuse a resume that would relax a budget the run has had in force: raise it, or set it
    to 0 (no limit). Budgets can only tighten."""
    for name, limit in budgets_in_force(entries).items():
        value = getattr(cfg.privacy, name)
        if limit is not None and (not value or value > limit):
            wanted = "0 (no limit)" if not value else f"{value:g}"
            raise FedprivError(f"a resume cannot relax privacy.{name}: the run has had {limit:g} in force, "
                               f"the configuration sets {wanted}; budgets can only tighten")
